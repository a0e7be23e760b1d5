//! Integration tests of `multipole-attn grad`: the `--reference` path against the library's
//! f64 reference gradients, the GPU path against it (skipped when no adapter exists, except
//! under CI=true), the .npz layout, and bad input (exit 2, a message naming what is wrong).

use crate::common::random_learned;
use crate::scratch::Scratch;
use multipole_attn::cpu::{self, fma_backward_varlen, widen};
use multipole_attn::random::normal_tensor;
use multipole_attn::{
    Downsample, FmaConfig, LearnedWeights, Method, Problem, Queries, Sequences, Shape,
};
use ndarray::{ArrayD, IxDyn};
use ndarray_npy::{write_npy, NpzReader, NpzWriter};
use std::collections::BTreeSet;
use std::fs::File;
use std::path::Path;
use std::process::Command;

struct Outcome {
    code: Option<i32>,
    stderr: String,
}

fn cli(args: &[String]) -> Outcome {
    let out = Command::new(env!("CARGO_BIN_EXE_multipole-attn"))
        .args(args)
        .output()
        .expect("run multipole-attn");
    Outcome {
        code: out.status.code(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn assert_bad_input(o: &Outcome, needles: &[&str]) {
    assert_eq!(o.code, Some(2), "stderr: {}", o.stderr);
    assert!(o.stderr.starts_with("error: "), "stderr: {}", o.stderr);
    for n in needles {
        assert!(o.stderr.contains(n), "expected {n:?} in: {}", o.stderr);
    }
}

fn write_f32(path: &Path, shape: &[usize], data: Vec<f32>) {
    write_npy(path, &ArrayD::from_shape_vec(IxDyn(shape), data).unwrap()).unwrap();
}

/// Q, K, V and dO of `shape` (2 or 4 axes), N(0, 1).
fn write_inputs(dir: &Scratch, shape: &[usize], seed: u64) -> [Vec<f32>; 4] {
    let len = shape.iter().product();
    let mut out: [Vec<f32>; 4] = Default::default();
    for (i, name) in ["Q", "K", "V", "DO"].iter().enumerate() {
        out[i] = normal_tensor(seed + i as u64, len);
        write_f32(&dir.path(&format!("{name}.npy")), shape, out[i].clone());
    }
    out
}

fn grad_args(dir: &Scratch, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = ["grad", "--q", "Q.npy", "--k", "K.npy", "--v", "V.npy"]
        .iter()
        .enumerate()
        .map(|(i, s)| {
            if i % 2 == 0 && i > 0 {
                dir.arg(s)
            } else {
                s.to_string()
            }
        })
        .collect();
    a.extend(["--dout".into(), dir.arg("DO.npy")]);
    a.extend(["--out".into(), dir.arg("G.npz")]);
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn write_weights(path: &Path, w: &LearnedWeights) {
    let mut npz = NpzWriter::new(File::create(path).unwrap());
    let (d, p) = (w.head_dim, w.rank);
    for (i, lw) in w.levels.iter().enumerate() {
        let (l, win) = (i + 1, w.block << i);
        for (key, data, shape) in [
            ("k_w", &lw.wk, vec![d, p, win]),
            ("k_b", &lw.bk, vec![d, p]),
            ("v_w", &lw.wv, vec![d, p, win]),
            ("v_b", &lw.bv, vec![d, p]),
            ("q_w", &lw.wq, vec![d, p, win]),
            ("q_b", &lw.bq, vec![d, p]),
        ] {
            let a = ArrayD::from_shape_vec(IxDyn(&shape), data.clone()).unwrap();
            npz.add_array(format!("{key}{l}"), &a).unwrap();
        }
    }
    npz.finish().unwrap();
}

/// Every array of an .npz as f64 (f32 or f64 on disk), with its shape.
fn read_npz(path: &Path) -> Vec<(String, Vec<usize>, Vec<f64>)> {
    let mut npz = NpzReader::new(File::open(path).unwrap()).unwrap();
    let mut out = Vec::new();
    for name in npz.names().unwrap() {
        let key = name.trim_end_matches(".npy").to_string();
        let (shape, data) = match npz.by_name::<ndarray::OwnedRepr<f64>, IxDyn>(&name) {
            Ok(a) => (a.shape().to_vec(), a.iter().copied().collect()),
            Err(_) => {
                let a: ArrayD<f32> = npz.by_name(&name).unwrap();
                (a.shape().to_vec(), a.iter().map(|&x| x as f64).collect())
            }
        };
        out.push((key, shape, data));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The library's f64 reference gradients as (name, shape, values), named like the .npz.
fn expected(
    x: &[Vec<f32>; 4],
    x_shape: &[usize],
    problem: &Problem,
    cfg: &FmaConfig,
) -> Vec<(String, Vec<usize>, Vec<f64>)> {
    let shape = problem.shape;
    let (q, k, v) = (widen(&x[0]), widen(&x[1]), widen(&x[2]));
    let method = Method::Fma(cfg.clone());
    let g = cpu::backward(&method, problem, (&q, &k, &v), &widen(&x[3])).unwrap();
    let mut out = vec![
        ("dq".to_string(), x_shape.to_vec(), g.dq),
        ("dk".to_string(), x_shape.to_vec(), g.dk),
        ("dv".to_string(), x_shape.to_vec(), g.dv),
    ];
    let (d, p) = (shape.head_dim, cfg.rank);
    for (i, lg) in g.weights.into_iter().flatten().enumerate() {
        let (l, win) = (i + 1, cfg.block << i);
        out.push((format!("k_w{l}"), vec![d, p, win], lg.wk));
        out.push((format!("k_b{l}"), vec![d, p], lg.bk));
        out.push((format!("v_w{l}"), vec![d, p, win], lg.wv));
        out.push((format!("v_b{l}"), vec![d, p], lg.bv));
        if cfg.queries == Queries::Coarse {
            out.push((format!("q_w{l}"), vec![d, p, win], lg.wq));
            out.push((format!("q_b{l}"), vec![d, p], lg.bq));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Compares two gradient sets; returns the worst error scaled by max(1, max|ref|) per array.
fn compare(got: &[(String, Vec<usize>, Vec<f64>)], want: &[(String, Vec<usize>, Vec<f64>)]) -> f64 {
    let names = |v: &[(String, Vec<usize>, Vec<f64>)]| -> BTreeSet<String> {
        v.iter().map(|a| a.0.clone()).collect()
    };
    assert_eq!(names(got), names(want));
    let mut worst = 0.0f64;
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.1, w.1, "{} shape", g.0);
        let scale = w.2.iter().fold(1.0f64, |m, x| m.max(x.abs()));
        let err =
            g.2.iter()
                .zip(&w.2)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
        assert!(err.is_finite(), "{}", g.0);
        worst = worst.max(err / scale);
    }
    worst
}

fn learned_case(dir: &Scratch, seed: u64) -> ([Vec<f32>; 4], Vec<usize>, Problem, FmaConfig) {
    let x_shape = vec![2, 1, 50, 8];
    let x = write_inputs(dir, &x_shape, seed);
    let problem = Problem::new(Shape::new(2, 1, 50, 8)).causal(true);
    let w = random_learned(seed, 8, 4, 2, 50);
    write_weights(&dir.path("W.npz"), &w);
    let cfg = FmaConfig::new(4, 2).downsample(Downsample::Learned(w));
    (x, x_shape, problem, cfg)
}

#[test]
fn reference_gradients_match_the_library() {
    let dir = Scratch::new("reference");
    let (x, x_shape, shape, cfg) = learned_case(&dir, 11);
    let w = dir.arg("W.npz");
    let out = cli(&grad_args(
        &dir,
        &[
            "--block",
            "4",
            "--rank",
            "2",
            "--causal",
            "--weights",
            &w,
            "--reference",
        ],
    ));
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let got = read_npz(&dir.path("G.npz"));
    assert!(got.iter().any(|a| a.0 == "k_w3"), "every level is written");
    let err = compare(&got, &expected(&x, &x_shape, &shape, &cfg));
    assert!(
        err <= 1e-12,
        "reference path differs from the library by {err}"
    );

    // Average mode, (n, d) input: exactly dq, dk, dv of the input's shape.
    let x = write_inputs(&dir, &[30, 5], 3);
    let out = cli(&grad_args(
        &dir,
        &["--block", "4", "--rank", "1", "--reference"],
    ));
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let got = read_npz(&dir.path("G.npz"));
    let cfg = FmaConfig::new(4, 1);
    let p = Problem::new(Shape::new(1, 1, 30, 5));
    let err = compare(&got, &expected(&x, &[30, 5], &p, &cfg));
    assert!(err <= 1e-12, "{err}");
}

/// `--queries coarse` (algorithm.md §6): the query weights' gradients are written too, the
/// reference path equals the library's and the GPU path is within the backward tolerance.
#[test]
fn coarse_query_gradients_on_both_paths() {
    let dir = Scratch::new("coarse");
    let x_shape = vec![1, 2, 70, 8];
    let x = write_inputs(&dir, &x_shape, 41);
    let shape = Problem::new(Shape::new(1, 2, 70, 8));
    let w = random_learned(41, 8, 4, 2, 70);
    write_weights(&dir.path("W.npz"), &w);
    let cfg = FmaConfig::new(4, 2)
        .queries(Queries::Coarse)
        .downsample(Downsample::Learned(w));
    let want = expected(&x, &x_shape, &shape, &cfg);
    let w = dir.arg("W.npz");
    let base = [
        "--block",
        "4",
        "--rank",
        "2",
        "--queries",
        "coarse",
        "--weights",
        &w,
    ];
    let out = cli(&grad_args(&dir, &[&base[..], &["--reference"]].concat()));
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let got = read_npz(&dir.path("G.npz"));
    assert!(
        got.iter().any(|a| a.0 == "q_w1"),
        "query weights' gradients"
    );
    let err = compare(&got, &want);
    assert!(
        err <= 1e-12,
        "reference path differs from the library by {err}"
    );
    let out = cli(&grad_args(&dir, &base));
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    if !ci && out.code == Some(1) && out.stderr.contains("no GPU adapter found") {
        eprintln!("no usable GPU adapter: skipping ({})", out.stderr.trim());
        return;
    }
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let err = compare(&read_npz(&dir.path("G.npz")), &want);
    eprintln!("coarse-query GPU gradients vs reference: worst scaled error {err:.2e}");
    assert!(err <= 2e-4, "{err}");
}

/// The GPU path within the tolerance of tests/gpu/backward.rs (2e-4 of each array's scale).
#[test]
fn gpu_gradients_match_the_reference_when_an_adapter_exists() {
    let dir = Scratch::new("gpu");
    let (x, x_shape, shape, cfg) = learned_case(&dir, 23);
    let w = dir.arg("W.npz");
    let out = cli(&grad_args(
        &dir,
        &["--block", "4", "--rank", "2", "--causal", "--weights", &w],
    ));
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    if !ci && out.code == Some(1) && out.stderr.contains("no GPU adapter found") {
        eprintln!("no usable GPU adapter: skipping ({})", out.stderr.trim());
        return;
    }
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let err = compare(
        &read_npz(&dir.path("G.npz")),
        &expected(&x, &x_shape, &shape, &cfg),
    );
    eprintln!("GPU gradients vs reference: worst scaled error {err:.2e}");
    assert!(err <= 2e-4, "{err}");
}

#[test]
fn bad_grad_input_is_exit_2_naming_it() {
    let dir = Scratch::new("bad");
    write_inputs(&dir, &[20, 4], 1);
    write_f32(&dir.path("DO.npy"), &[20, 5], normal_tensor(9, 100));
    assert_bad_input(
        &cli(&grad_args(&dir, &["--block", "4", "--reference"])),
        &["dO", "(20, 4)", "(20, 5)"],
    );
    write_inputs(&dir, &[20, 4], 1);
    // Weights for d = 4, m = 8 given with m = 4.
    write_weights(
        &dir.path("W.npz"),
        &LearnedWeights::box_init_for(4, 8, 2, 20),
    );
    let w = dir.arg("W.npz");
    assert_bad_input(
        &cli(&grad_args(
            &dir,
            &["--block", "4", "--weights", &w, "--reference"],
        )),
        &["k_w1", "expected (4, 2, 4)"],
    );
    // FMA options with --dense, and lengths that do not add up to the tensors'.
    assert_bad_input(
        &cli(&grad_args(&dir, &["--dense", "--seqlens", "10,11"])),
        &["10,11"],
    );
    assert_bad_input(
        &cli(&grad_args(&dir, &["--dense", "--block", "4"])),
        &["--dense", "--block"],
    );
    assert_bad_input(
        &cli(&grad_args(&dir, &["--lse", &dir.arg("L.npy")])),
        &["--lse"],
    );
    std::fs::remove_file(dir.path("DO.npy")).unwrap();
    assert_bad_input(&cli(&grad_args(&dir, &["--reference"])), &["dO", "DO.npy"]);
}

/// Grouped-query heads: dq of Q's shape, dk and dv of K's (fewer heads), equal to the library's
/// reference gradients.
#[test]
fn grouped_query_gradients_have_the_shape_of_k() {
    let dir = Scratch::new("gqa");
    let (q_dims, kv_dims) = (vec![1, 4, 40, 8], vec![1, 1, 40, 8]);
    let mut x: [Vec<f32>; 4] = Default::default();
    for (i, (name, dims)) in [
        ("Q", &q_dims),
        ("K", &kv_dims),
        ("V", &kv_dims),
        ("DO", &q_dims),
    ]
    .into_iter()
    .enumerate()
    {
        x[i] = normal_tensor(70 + i as u64, dims.iter().product());
        write_f32(&dir.path(&format!("{name}.npy")), dims, x[i].clone());
    }
    let out = cli(&grad_args(
        &dir,
        &["--block", "4", "--rank", "2", "--reference"],
    ));
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let got = read_npz(&dir.path("G.npz"));
    let shape = Shape::new(1, 4, 40, 8).with_kv_heads(1);
    let mut want = expected(&x, &q_dims, &Problem::new(shape), &FmaConfig::new(4, 2));
    for w in want.iter_mut().filter(|w| w.0 == "dk" || w.0 == "dv") {
        w.1 = kv_dims.clone();
    }
    assert!(compare(&got, &want) <= 1e-12);
}

/// `grad --dense`: exact attention's gradients, grouped-query heads and causal, equal to
/// `cpu::dense_backward` on the reference path and within the GPU tolerance (2e-4 of each
/// array's scale) on the GPU path when an adapter exists; no weight arrays.
#[test]
fn dense_gradients_match_the_library() {
    let dir = Scratch::new("dense");
    let (q_dims, kv_dims) = (vec![2, 4, 33, 8], vec![2, 2, 33, 8]);
    let mut x: [Vec<f32>; 4] = Default::default();
    for (i, (name, dims)) in [
        ("Q", &q_dims),
        ("K", &kv_dims),
        ("V", &kv_dims),
        ("DO", &q_dims),
    ]
    .into_iter()
    .enumerate()
    {
        x[i] = normal_tensor(90 + i as u64, dims.iter().product());
        write_f32(&dir.path(&format!("{name}.npy")), dims, x[i].clone());
    }
    let shape = Shape::new(2, 4, 33, 8).with_kv_heads(2);
    let g = multipole_attn::cpu::dense_backward(
        &widen(&x[0]),
        &widen(&x[1]),
        &widen(&x[2]),
        &widen(&x[3]),
        shape,
        true,
    )
    .unwrap();
    let want = vec![
        ("dk".to_string(), kv_dims.clone(), g.dk),
        ("dq".to_string(), q_dims.clone(), g.dq),
        ("dv".to_string(), kv_dims.clone(), g.dv),
    ];
    let out = cli(&grad_args(&dir, &["--dense", "--causal", "--reference"]));
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(compare(&read_npz(&dir.path("G.npz")), &want) <= 1e-12);
    let out = cli(&grad_args(&dir, &["--dense", "--causal"]));
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    if !ci && out.code == Some(1) && out.stderr.contains("no GPU adapter found") {
        eprintln!("no usable GPU adapter: skipping ({})", out.stderr.trim());
        return;
    }
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let err = compare(&read_npz(&dir.path("G.npz")), &want);
    eprintln!("dense GPU gradients vs reference: worst scaled error {err:.2e}");
    assert!(err <= 2e-4, "{err}");
}

/// A packed batch (`--seqlens`) and a padded one (`--lengths`): the library's varlen
/// reference gradients on the CPU path, the same within the GPU tolerance on the GPU path
/// (when an adapter exists), and bad lengths are exit 2 naming them.
#[test]
fn variable_length_gradients_match_the_library() {
    let dir = Scratch::new("varlen");
    let x = write_inputs(&dir, &[20, 4], 5);
    let seqs = Sequences::packed(vec![5, 15]).unwrap();
    let cfg = FmaConfig::new(4, 1);
    let g = fma_backward_varlen(
        (&widen(&x[0]), &widen(&x[1]), &widen(&x[2]), &widen(&x[3])),
        Shape::new(1, 1, 20, 4),
        &seqs,
        &cfg,
    )
    .unwrap();
    let want = vec![
        ("dk".to_string(), vec![20, 4], g.dk),
        ("dq".to_string(), vec![20, 4], g.dq),
        ("dv".to_string(), vec![20, 4], g.dv),
    ];
    let base = ["--block", "4", "--rank", "1", "--seqlens", "5,15"];
    let out = cli(&grad_args(&dir, &[&base[..], &["--reference"]].concat()));
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(compare(&read_npz(&dir.path("G.npz")), &want) <= 1e-12);
    let out = cli(&grad_args(&dir, &base));
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    if ci || out.code != Some(1) || !out.stderr.contains("no GPU adapter found") {
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        let err = compare(&read_npz(&dir.path("G.npz")), &want);
        assert!(err <= 2e-4, "GPU varlen gradients: {err}");
    }

    // Padded: two rows of 10 with lengths 10 and 4; the padding's gradients are 0.
    let x = write_inputs(&dir, &[2, 1, 10, 4], 6);
    let padded = Sequences::padded(10, vec![10, 4]).unwrap();
    let g = fma_backward_varlen(
        (&widen(&x[0]), &widen(&x[1]), &widen(&x[2]), &widen(&x[3])),
        Shape::new(2, 1, 10, 4),
        &padded,
        &cfg,
    )
    .unwrap();
    assert!(g.dq[(10 + 4) * 4..].iter().all(|&v| v == 0.0));
    let dims = vec![2, 1, 10, 4];
    let want = vec![
        ("dk".to_string(), dims.clone(), g.dk),
        ("dq".to_string(), dims.clone(), g.dq),
        ("dv".to_string(), dims, g.dv),
    ];
    let out = cli(&grad_args(
        &dir,
        &[
            "--block",
            "4",
            "--rank",
            "1",
            "--lengths",
            "10,4",
            "--reference",
        ],
    ));
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(compare(&read_npz(&dir.path("G.npz")), &want) <= 1e-12);

    let out = cli(&grad_args(&dir, &["--block", "4", "--lengths", "10,11"]));
    assert_bad_input(&out, &["--lengths", "11"]);
}
