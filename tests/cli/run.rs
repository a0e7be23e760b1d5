//! Integration tests of the `multipole-attn` binary. They run it with `--reference` (the f64 CPU
//! path), so they pass on machines without a GPU; the one GPU test skips when `info` finds no
//! adapter.

use crate::scratch::Scratch;
use multipole_attn::cpu::{self, dense_attention, fma_forward, widen};
use multipole_attn::random::normal_tensor;
use multipole_attn::{Downsample, FmaConfig, LearnedWeights, Method, Problem, Queries, Shape};
use ndarray::{Array, ArrayD, IxDyn, ShapeBuilder};
use ndarray_npy::{read_npy, write_npy, NpzWriter};
use std::ffi::OsString;
use std::fs::File;
use std::path::Path;
use std::process::Command;

/// What a run of the binary produced.
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Outcome {
    fn assert_ok(&self) {
        assert_eq!(self.code, Some(0), "stderr: {}", self.stderr);
    }

    /// Asserts a bad-input failure (exit 2) whose message contains every one of `needles`.
    fn assert_bad_input(&self, needles: &[&str]) {
        assert_eq!(self.code, Some(2), "stderr: {}", self.stderr);
        assert!(
            self.stderr.starts_with("error: "),
            "stderr: {}",
            self.stderr
        );
        for n in needles {
            assert!(
                self.stderr.contains(n),
                "expected {n:?} in stderr: {}",
                self.stderr
            );
        }
    }
}

fn cli<I, S>(args: I) -> Outcome
where
    I: IntoIterator<Item = S>,
    S: Into<OsString>,
{
    let out = Command::new(env!("CARGO_BIN_EXE_multipole-attn"))
        .args(args.into_iter().map(Into::into))
        .output()
        .expect("run multipole-attn");
    Outcome {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `run --q Q --k K --v V --out O` for the files in `dir`, then `extra`.
fn run_args(dir: &Scratch, extra: &[&str]) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec!["run".into()];
    for (flag, file) in [
        ("--q", "Q.npy"),
        ("--k", "K.npy"),
        ("--v", "V.npy"),
        ("--out", "O.npy"),
    ] {
        a.push(flag.into());
        a.push(dir.path(file).into());
    }
    a.extend(extra.iter().map(OsString::from));
    a
}

fn write_f32(path: &Path, shape: &[usize], data: Vec<f32>) {
    let arr = ArrayD::from_shape_vec(IxDyn(shape), data).expect("shape");
    write_npy(path, &arr).expect("write npy");
}

fn write_f64(path: &Path, shape: &[usize], data: Vec<f64>) {
    let arr = ArrayD::from_shape_vec(IxDyn(shape), data).expect("shape");
    write_npy(path, &arr).expect("write npy");
}

fn read_f64(path: &Path) -> ArrayD<f64> {
    read_npy(path).expect("read f64 npy")
}

/// Writes random f32 Q, K, V of `shape` into `dir` and returns them.
fn write_qkv(dir: &Scratch, shape: &[usize], seed: u64) -> [Vec<f32>; 3] {
    let len = shape.iter().product();
    let t = [
        normal_tensor(seed, len),
        normal_tensor(seed + 1, len),
        normal_tensor(seed + 2, len),
    ];
    for (name, data) in ["Q.npy", "K.npy", "V.npy"].iter().zip(&t) {
        write_f32(&dir.path(name), shape, data.clone());
    }
    t
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn to_vec(a: ArrayD<f64>) -> Vec<f64> {
    a.iter().copied().collect()
}

#[test]
fn n_d_input_round_trips_and_matches_cpu_fma() {
    let dir = Scratch::new("nd");
    let [q, k, v] = write_qkv(&dir, &[37, 8], 11);
    let lse_path = dir.path("LSE.npy");
    let out = cli(run_args(
        &dir,
        &[
            "--reference",
            "--block",
            "8",
            "--rank",
            "2",
            "--lse",
            lse_path.to_str().unwrap(),
        ],
    ));
    out.assert_ok();
    let o = read_f64(&dir.path("O.npy"));
    let lse = read_f64(&lse_path);
    assert_eq!(o.shape(), &[37, 8]);
    assert_eq!(lse.shape(), &[37]);
    let want = fma_forward(
        &widen(&q),
        &widen(&k),
        &widen(&v),
        Shape::new(1, 1, 37, 8),
        &FmaConfig::new(8, 2),
    )
    .unwrap();
    assert!(max_abs_diff(&to_vec(o), &want.o) <= 1e-12);
    assert!(max_abs_diff(&to_vec(lse), &want.lse) <= 1e-12);
}

#[test]
fn batch_heads_input_round_trips_causal_without_correction() {
    let dir = Scratch::new("bhnd");
    let dims = [2, 3, 50, 4];
    let [q, k, v] = write_qkv(&dir, &dims, 21);
    let lse_path = dir.path("LSE.npy");
    let out = cli(run_args(
        &dir,
        &[
            "--reference",
            "--block",
            "4",
            "--causal",
            "--no-count-correction",
            "--lse",
            lse_path.to_str().unwrap(),
        ],
    ));
    out.assert_ok();
    let o = read_f64(&dir.path("O.npy"));
    let lse = read_f64(&lse_path);
    assert_eq!(o.shape(), &dims);
    assert_eq!(lse.shape(), &[2, 3, 50]);
    let method = Method::Fma(FmaConfig::new(4, 2).count_correction(false));
    let problem = Problem::new(Shape::new(2, 3, 50, 4)).causal(true);
    let want = cpu::forward(&method, &problem, &widen(&q), &widen(&k), &widen(&v)).unwrap();
    assert!(max_abs_diff(&to_vec(o), &want.o) <= 1e-12);
    assert!(max_abs_diff(&to_vec(lse), &want.lse) <= 1e-12);
}

#[test]
fn f64_input_keeps_f64_precision_in_the_reference() {
    let dir = Scratch::new("f64");
    let dims = [29, 6];
    let len = 29 * 6;
    // Perturb below f32 resolution: a path through f32 would lose it and miss by ~1e-9.
    let make = |seed| -> Vec<f64> {
        let base = normal_tensor(seed, len);
        let fine = normal_tensor(seed + 100, len);
        base.iter()
            .zip(&fine)
            .map(|(&a, &b)| a as f64 + 1e-9 * b as f64)
            .collect()
    };
    let (q, k, v) = (make(1), make(2), make(3));
    write_f64(&dir.path("Q.npy"), &dims, q.clone());
    write_f64(&dir.path("K.npy"), &dims, k.clone());
    write_f64(&dir.path("V.npy"), &dims, v.clone());
    cli(run_args(&dir, &["--reference", "--block", "4"])).assert_ok();
    let o = read_f64(&dir.path("O.npy"));
    let want = fma_forward(&q, &k, &v, Shape::new(1, 1, 29, 6), &FmaConfig::new(4, 2)).unwrap();
    assert!(max_abs_diff(&to_vec(o), &want.o) <= 1e-13);
}

#[test]
fn fortran_order_input_is_read_in_logical_order() {
    let dir = Scratch::new("fortran");
    let (n, d) = (21, 5);
    let t: Vec<Vec<f32>> = (0..3).map(|s| normal_tensor(40 + s, n * d)).collect();
    for (name, data) in ["Q.npy", "K.npy", "V.npy"].iter().zip(&t) {
        // Same logical (n, d) array as row-major `data`, stored column-major.
        let c = Array::from_shape_vec((n, d), data.clone()).unwrap();
        let mut f = Array::zeros((n, d).f());
        f.assign(&c);
        write_npy(dir.path(name), &f).unwrap();
    }
    cli(run_args(&dir, &["--reference", "--block", "4"])).assert_ok();
    let o = read_f64(&dir.path("O.npy"));
    let want = fma_forward(
        &widen(&t[0]),
        &widen(&t[1]),
        &widen(&t[2]),
        Shape::new(1, 1, n, d),
        &FmaConfig::new(4, 2),
    )
    .unwrap();
    assert!(max_abs_diff(&to_vec(o), &want.o) <= 1e-12);
}

#[test]
fn dense_reference_matches_cpu_dense() {
    let dir = Scratch::new("dense");
    let dims = [2, 1, 20, 4];
    let [q, k, v] = write_qkv(&dir, &dims, 31);
    let shape = Shape::new(2, 1, 20, 4);
    for causal in [false, true] {
        let lse_path = dir.path("LSE.npy");
        let mut extra = vec![
            "--dense",
            "--reference",
            "--lse",
            lse_path.to_str().unwrap(),
        ];
        if causal {
            extra.push("--causal");
        }
        cli(run_args(&dir, &extra)).assert_ok();
        let want = dense_attention(&widen(&q), &widen(&k), &widen(&v), shape, causal).unwrap();
        let o = read_f64(&dir.path("O.npy"));
        assert_eq!(o.shape(), &dims);
        assert!(
            max_abs_diff(&to_vec(o), &want.o) <= 1e-12,
            "causal {causal}"
        );
        assert!(max_abs_diff(&to_vec(read_f64(&lse_path)), &want.lse) <= 1e-12);
    }
}

#[test]
fn dense_rejects_fma_options() {
    let dir = Scratch::new("dense-opts");
    write_qkv(&dir, &[8, 2], 1);
    let out = cli(run_args(&dir, &["--dense", "--reference", "--block", "4"]));
    assert_eq!(out.code, Some(2), "stderr: {}", out.stderr);
}

/// Writes `w` as an .npz with keys k_w{l}, k_b{l}, v_w{l}, v_b{l}, levels `keep` only, as f32
/// or f64; `override_kw` replaces one key's array (to make a wrong shape).
fn write_weights(
    path: &Path,
    w: &LearnedWeights,
    keep: &[usize],
    as_f64: bool,
    override_kw: Option<(&str, Vec<usize>)>,
) {
    let mut npz = NpzWriter::new(File::create(path).unwrap());
    let (d, p) = (w.head_dim, w.rank);
    for &l in keep {
        let lw = &w.levels[l - 1];
        let win = w.block << (l - 1);
        let arrays: [(&str, &Vec<f32>, Vec<usize>); 4] = [
            ("k_w", &lw.wk, vec![d, p, win]),
            ("k_b", &lw.bk, vec![d, p]),
            ("v_w", &lw.wv, vec![d, p, win]),
            ("v_b", &lw.bv, vec![d, p]),
        ];
        for (prefix, data, shape) in arrays {
            let key = format!("{prefix}{l}");
            let (data, shape) = match &override_kw {
                Some((k, s)) if *k == key => (vec![0.0; s.iter().product()], s.clone()),
                _ => (data.clone(), shape),
            };
            if as_f64 {
                let a = ArrayD::from_shape_vec(IxDyn(&shape), widen(&data)).unwrap();
                npz.add_array(key, &a).unwrap();
            } else {
                let a = ArrayD::from_shape_vec(IxDyn(&shape), data).unwrap();
                npz.add_array(key, &a).unwrap();
            }
        }
    }
    npz.finish().unwrap();
}

#[test]
fn learned_box_weights_equal_average_on_full_windows() {
    let dir = Scratch::new("learned");
    // n = 64, m = 8: two coarse levels, windows 8 and 16; 64 is a multiple of the top window.
    let (n, d, m, p) = (64, 4, 8, 2);
    write_qkv(&dir, &[n, d], 51);
    let w = LearnedWeights::box_init_for(d, m, p, n);
    assert_eq!(w.levels.len(), 2);
    write_weights(&dir.path("W32.npz"), &w, &[1, 2], false, None);
    write_weights(&dir.path("W64.npz"), &w, &[1, 2], true, None);
    let common = ["--reference", "--block", "8", "--rank", "2"];
    let o_of = |extra: &[&str]| {
        let args: Vec<&str> = common.iter().chain(extra).copied().collect();
        cli(run_args(&dir, &args)).assert_ok();
        to_vec(read_f64(&dir.path("O.npy")))
    };
    let average = o_of(&[]);
    let w32 = dir.path("W32.npz");
    let w64 = dir.path("W64.npz");
    for extra in [
        vec![
            "--downsample",
            "learned",
            "--weights",
            w32.to_str().unwrap(),
        ],
        vec!["--weights", w64.to_str().unwrap()],
        vec!["--downsample", "learned"],
    ] {
        let learned = o_of(&extra);
        assert!(max_abs_diff(&learned, &average) <= 1e-10, "{extra:?}");
    }
    // And it is the library's Learned mode, not a silent fallback to Average.
    let q = widen(&normal_tensor(51, n * d));
    let k = widen(&normal_tensor(52, n * d));
    let v = widen(&normal_tensor(53, n * d));
    let cfg = FmaConfig::new(m, p).downsample(Downsample::Learned(w));
    let want = fma_forward(&q, &k, &v, Shape::new(1, 1, n, d), &cfg).unwrap();
    assert!(max_abs_diff(&o_of(&["--weights", w32.to_str().unwrap()]), &want.o) <= 1e-12);
}

/// Writes every key of `w` (k_, v_ and q_ weights and biases) for levels 1..=L as f32; level
/// `drop_qb` (if any) without its q_b key.
fn write_weights_with_queries(path: &Path, w: &LearnedWeights, drop_qb: Option<usize>) {
    let mut npz = NpzWriter::new(File::create(path).unwrap());
    let (d, p) = (w.head_dim, w.rank);
    for (i, lw) in w.levels.iter().enumerate() {
        let l = i + 1;
        let win = w.block << i;
        for (prefix, data, shape) in [
            ("k_w", &lw.wk, vec![d, p, win]),
            ("k_b", &lw.bk, vec![d, p]),
            ("v_w", &lw.wv, vec![d, p, win]),
            ("v_b", &lw.bv, vec![d, p]),
            ("q_w", &lw.wq, vec![d, p, win]),
            ("q_b", &lw.bq, vec![d, p]),
        ] {
            if prefix == "q_b" && drop_qb == Some(l) {
                continue;
            }
            let a = ArrayD::from_shape_vec(IxDyn(&shape), data.clone()).unwrap();
            npz.add_array(format!("{prefix}{l}"), &a).unwrap();
        }
    }
    npz.finish().unwrap();
}

#[test]
fn coarse_queries_read_query_weights_or_box_initialise_them() {
    let dir = Scratch::new("coarse-q");
    let (n, d, m, p) = (100, 4, 8, 2);
    let [q, k, v] = write_qkv(&dir, &[n, d], 71).map(|t| widen(&t));
    let shape = Shape::new(1, 1, n, d);
    let mut w = LearnedWeights::box_init_for(d, m, p, n);
    for (i, lw) in w.levels.iter_mut().enumerate() {
        let noise = normal_tensor(80 + i as u64, lw.wq.len());
        lw.wq
            .iter_mut()
            .zip(noise)
            .for_each(|(x, e)| *x += 0.05 * e);
        lw.bq.iter_mut().for_each(|b| *b = 0.3);
    }
    let with_q = dir.path("Wq.npz");
    write_weights_with_queries(&with_q, &w, None);
    let without_q = dir.path("W.npz");
    write_weights(&without_q, &w, &[1, 2, 3], false, None);
    let common = [
        "--reference",
        "--block",
        "8",
        "--rank",
        "2",
        "--queries",
        "coarse",
    ];
    let o_of = |extra: &[&str]| {
        let args: Vec<&str> = common.iter().chain(extra).copied().collect();
        cli(run_args(&dir, &args)).assert_ok();
        to_vec(read_f64(&dir.path("O.npy")))
    };
    let coarse = FmaConfig::new(m, p).queries(Queries::Coarse);
    let want = fma_forward(&q, &k, &v, shape, &coarse).unwrap();
    assert!(max_abs_diff(&o_of(&[]), &want.o) <= 1e-12);
    // q_w{l}, q_b{l} are read ...
    let learned = coarse.clone().downsample(Downsample::Learned(w.clone()));
    let want = fma_forward(&q, &k, &v, shape, &learned).unwrap();
    assert!(max_abs_diff(&o_of(&["--weights", with_q.to_str().unwrap()]), &want.o) <= 1e-12);
    // ... and absent ones take the box initialisation.
    let boxed = LearnedWeights::box_init_for(d, m, p, n);
    for (lw, b) in w.levels.iter_mut().zip(&boxed.levels) {
        lw.wq = b.wq.clone();
        lw.bq = b.bq.clone();
    }
    let learned = coarse.downsample(Downsample::Learned(w.clone()));
    let want = fma_forward(&q, &k, &v, shape, &learned).unwrap();
    assert!(max_abs_diff(&o_of(&["--weights", without_q.to_str().unwrap()]), &want.o) <= 1e-12);
    // q_w without q_b is a mistake, named.
    let half = dir.path("Whalf.npz");
    write_weights_with_queries(&half, &w, Some(2));
    cli(run_args(
        &dir,
        &[&common[..], &["--weights", half.to_str().unwrap()]].concat(),
    ))
    .assert_bad_input(&["no q_b2"]);
}

#[test]
fn causal_coarse_queries_are_bad_input() {
    let dir = Scratch::new("coarse-causal");
    write_qkv(&dir, &[64, 4], 1);
    for backend in [&["--reference"][..], &[]] {
        let args = [
            backend,
            &["--block", "8", "--queries", "coarse", "--causal"],
        ]
        .concat();
        cli(run_args(&dir, &args)).assert_bad_input(&["bidirectional only", "causal"]);
    }
    let out = cli(run_args(&dir, &["--dense", "--queries", "coarse"]));
    assert_eq!(out.code, Some(2), "stderr: {}", out.stderr);
}

#[test]
fn weights_with_average_is_an_error() {
    let dir = Scratch::new("w-avg");
    write_qkv(&dir, &[64, 4], 1);
    let w = LearnedWeights::box_init_for(4, 8, 2, 64);
    let wp = dir.path("W.npz");
    write_weights(&wp, &w, &[1, 2], false, None);
    let out = cli(run_args(
        &dir,
        &[
            "--reference",
            "--block",
            "8",
            "--downsample",
            "average",
            "--weights",
            wp.to_str().unwrap(),
        ],
    ));
    out.assert_bad_input(&["--downsample average"]);
}

#[test]
fn weights_missing_level_2_is_bad_input() {
    let dir = Scratch::new("w-level");
    write_qkv(&dir, &[64, 4], 1);
    let w = LearnedWeights::box_init_for(4, 8, 2, 64);
    let wp = dir.path("W.npz");
    write_weights(&wp, &w, &[1], false, None);
    let out = cli(run_args(
        &dir,
        &[
            "--reference",
            "--block",
            "8",
            "--weights",
            wp.to_str().unwrap(),
        ],
    ));
    out.assert_bad_input(&["level 2"]);
}

#[test]
fn weights_with_wrong_shape_name_key_and_shapes() {
    let dir = Scratch::new("w-shape");
    write_qkv(&dir, &[64, 4], 1);
    let w = LearnedWeights::box_init_for(4, 8, 2, 64);
    let wp = dir.path("W.npz");
    write_weights(&wp, &w, &[1, 2], false, Some(("k_w2", vec![4, 2, 12])));
    let out = cli(run_args(
        &dir,
        &[
            "--reference",
            "--block",
            "8",
            "--weights",
            wp.to_str().unwrap(),
        ],
    ));
    out.assert_bad_input(&["k_w2 has shape (4, 2, 12), expected (4, 2, 16)"]);
    // Same length, wrong axes: caught by the shape check, not only by the length check.
    write_weights(&wp, &w, &[1, 2], false, Some(("k_b1", vec![2, 4])));
    let out = cli(run_args(
        &dir,
        &[
            "--reference",
            "--block",
            "8",
            "--weights",
            wp.to_str().unwrap(),
        ],
    ));
    out.assert_bad_input(&["k_b1 has shape (2, 4), expected (4, 2)"]);
}

/// Rewrites the .npz at `from` into `to` with every member deflate-compressed, as
/// `np.savez_compressed` writes them; `edit` may replace a member's bytes first.
fn recompress(from: &Path, to: &Path, edit: impl Fn(&str, Vec<u8>) -> Vec<u8>) {
    use std::io::{Read, Write};
    use zip::write::SimpleFileOptions;
    let mut src = zip::ZipArchive::new(File::open(from).unwrap()).unwrap();
    let mut dst = zip::ZipWriter::new(File::create(to).unwrap());
    let deflated =
        SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    for i in 0..src.len() {
        let mut member = src.by_index(i).unwrap();
        let name = member.name().to_owned();
        let mut bytes = Vec::new();
        member.read_to_end(&mut bytes).unwrap();
        dst.start_file(name.as_str(), deflated).unwrap();
        dst.write_all(&edit(&name, bytes)).unwrap();
    }
    dst.finish().unwrap();
}

#[test]
fn compressed_weights_read_as_stored_ones_and_lying_sizes_are_refused() {
    let dir = Scratch::new("w-deflate");
    let (n, d, m, p) = (64, 4, 8, 2);
    write_qkv(&dir, &[n, d], 61);
    // Weights that are not the box initialisation, so that reading them matters.
    let mut w = LearnedWeights::box_init_for(d, m, p, n);
    for (i, lw) in w.levels.iter_mut().enumerate() {
        lw.wk = normal_tensor(70 + i as u64, lw.wk.len());
        lw.bv = normal_tensor(80 + i as u64, lw.bv.len());
    }
    let (stored, deflated) = (dir.path("W.npz"), dir.path("Wz.npz"));
    write_weights(&stored, &w, &[1, 2], false, None);
    recompress(&stored, &deflated, |_, b| b);
    let o_of = |weights: &Path| {
        let args = [
            "--reference",
            "--block",
            "8",
            "--weights",
            weights.to_str().unwrap(),
        ];
        cli(run_args(&dir, &args)).assert_ok();
        to_vec(read_f64(&dir.path("O.npy")))
    };
    let want = o_of(&stored);
    assert_eq!(
        o_of(&deflated),
        want,
        "deflated weights must read exactly as stored ones"
    );
    let cfg = FmaConfig::new(m, p).downsample(Downsample::Learned(w.clone()));
    let q = widen(&normal_tensor(61, n * d));
    let k = widen(&normal_tensor(62, n * d));
    let v = widen(&normal_tensor(63, n * d));
    let lib = fma_forward(&q, &k, &v, Shape::new(1, 1, n, d), &cfg).unwrap();
    assert!(max_abs_diff(&want, &lib.o) <= 1e-12);

    // A member whose header claims 2^40 columns (terabytes once inflated): refused at its
    // header, before anything is allocated.
    let bomb = dir.path("Wbomb.npz");
    recompress(&stored, &bomb, |name, b| {
        if name != "k_w1.npy" {
            return b;
        }
        let a = ArrayD::<f32>::zeros(IxDyn(&[4, 2, 1]));
        let mut out = Vec::new();
        ndarray_npy::WriteNpyExt::write_npy(&a, &mut out).unwrap();
        // Same header length: the longer shape takes 12 of the header's padding spaces.
        let (from, to) = (b"(4, 2, 1)".as_slice(), b"(4, 2, 1099511627776)".as_slice());
        let at = out.windows(from.len()).position(|w| w == from).unwrap();
        let end = out.iter().position(|&c| c == b'\n').unwrap();
        let mut edited = out[..at].to_vec();
        edited.extend_from_slice(to);
        edited.extend_from_slice(&out[at + from.len()..end - (to.len() - from.len())]);
        edited.extend_from_slice(&out[end..]);
        edited
    });
    let args = [
        "--reference",
        "--block",
        "8",
        "--weights",
        bomb.to_str().unwrap(),
    ];
    cli(run_args(&dir, &args)).assert_bad_input(&["k_w1 has shape (4, 2, 1099511627776)"]);
    // The right shape in the header but half the data: the declared size disagrees.
    let short = dir.path("Wshort.npz");
    recompress(&stored, &short, |name, mut b| {
        if name == "v_w2.npy" {
            b.truncate(b.len() - 64);
        }
        b
    });
    let args = [
        "--reference",
        "--block",
        "8",
        "--weights",
        short.to_str().unwrap(),
    ];
    cli(run_args(&dir, &args)).assert_bad_input(&["v_w2", "declares"]);
}

#[test]
fn weights_missing_a_key_of_a_present_level_names_it() {
    let dir = Scratch::new("w-key");
    write_qkv(&dir, &[64, 4], 1);
    let w = LearnedWeights::box_init_for(4, 8, 2, 64);
    // Level 1 complete, level 2 only k_w2.
    let wp = dir.path("W.npz");
    let mut npz = NpzWriter::new(File::create(&wp).unwrap());
    let lw1 = &w.levels[0];
    for (key, data, shape) in [
        ("k_w1", &lw1.wk, vec![4, 2, 8]),
        ("k_b1", &lw1.bk, vec![4, 2]),
        ("v_w1", &lw1.wv, vec![4, 2, 8]),
        ("v_b1", &lw1.bv, vec![4, 2]),
        ("k_w2", &w.levels[1].wk, vec![4, 2, 16]),
    ] {
        npz.add_array(
            key,
            &ArrayD::from_shape_vec(IxDyn(&shape), data.clone()).unwrap(),
        )
        .unwrap();
    }
    npz.finish().unwrap();
    let out = cli(run_args(
        &dir,
        &[
            "--reference",
            "--block",
            "8",
            "--weights",
            wp.to_str().unwrap(),
        ],
    ));
    out.assert_bad_input(&["k_b2"]);
}

#[test]
fn mismatched_shapes_are_bad_input() {
    let dir = Scratch::new("mismatch");
    write_qkv(&dir, &[37, 8], 1);
    write_f32(&dir.path("K.npy"), &[37, 6], normal_tensor(9, 37 * 6));
    let out = cli(run_args(&dir, &["--reference"]));
    out.assert_bad_input(&["same shape", "(37, 8)", "(37, 6)"]);
}

#[test]
fn three_axes_are_bad_input() {
    let dir = Scratch::new("ndim");
    write_qkv(&dir, &[2, 10, 4], 1);
    cli(run_args(&dir, &["--reference"])).assert_bad_input(&["(2, 10, 4)", "axes"]);
}

#[test]
fn empty_axis_is_bad_input() {
    let dir = Scratch::new("empty");
    write_qkv(&dir, &[0, 4], 1);
    cli(run_args(&dir, &["--reference"])).assert_bad_input(&["seq"]);
}

#[test]
fn missing_file_is_bad_input() {
    let dir = Scratch::new("missing");
    write_qkv(&dir, &[8, 2], 1);
    std::fs::remove_file(dir.path("V.npy")).unwrap();
    cli(run_args(&dir, &["--reference"])).assert_bad_input(&["V", "V.npy"]);
}

#[test]
fn truncated_npy_is_bad_input() {
    let dir = Scratch::new("truncated");
    write_qkv(&dir, &[37, 8], 1);
    let path = dir.path("Q.npy");
    let len = std::fs::metadata(&path).unwrap().len();
    File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    cli(run_args(&dir, &["--reference"])).assert_bad_input(&["Q", "truncated"]);
    // Cut inside the header too.
    File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(20)
        .unwrap();
    cli(run_args(&dir, &["--reference"])).assert_bad_input(&["Q", "truncated"]);
}

#[test]
fn not_an_npy_file_is_bad_input() {
    let dir = Scratch::new("garbage");
    write_qkv(&dir, &[8, 2], 1);
    std::fs::write(dir.path("K.npy"), b"this is not a numpy file at all").unwrap();
    cli(run_args(&dir, &["--reference"])).assert_bad_input(&["K", "not a valid .npy"]);
}

#[test]
fn int_dtype_is_bad_input() {
    let dir = Scratch::new("int");
    write_qkv(&dir, &[8, 2], 1);
    let ints = ArrayD::from_shape_vec(IxDyn(&[8, 2]), (0..16i64).collect()).unwrap();
    write_npy(dir.path("Q.npy"), &ints).unwrap();
    cli(run_args(&dir, &["--reference"])).assert_bad_input(&["Q", "int64", "float32"]);
}

#[test]
fn invalid_rank_is_bad_input() {
    let dir = Scratch::new("rank");
    write_qkv(&dir, &[16, 2], 1);
    cli(run_args(
        &dir,
        &["--reference", "--block", "8", "--rank", "3"],
    ))
    .assert_bad_input(&["rank"]);
    cli(run_args(
        &dir,
        &["--reference", "--downsample", "learned", "--rank", "0"],
    ))
    .assert_bad_input(&["rank"]);
}

#[test]
fn missing_output_directory_is_bad_input() {
    let dir = Scratch::new("outdir");
    write_qkv(&dir, &[8, 2], 1);
    let mut args = run_args(&dir, &[]);
    let out_path = args.len() - 1;
    args[out_path] = dir.path("no/such/dir/O.npy").into();
    args.push("--reference".into());
    cli(args).assert_bad_input(&["does not exist"]);
}

#[test]
fn info_lists_adapters_or_says_none() {
    let out = cli(["info"]);
    match out.code {
        Some(0) => assert!(out.stdout.contains("adapter 0:"), "{}", out.stdout),
        Some(1) => assert!(out.stderr.contains("no adapter found"), "{}", out.stderr),
        other => panic!("info exited with {other:?}: {}", out.stderr),
    }
}

/// On a machine with a usable adapter, the GPU path agrees with the reference to f32 accuracy.
/// Skips when the library finds no adapter it can use (the run then fails with exit 1 and
/// "no GPU adapter found"), except under CI=true, where that is a failure.
#[test]
fn gpu_matches_reference_when_an_adapter_exists() {
    let dir = Scratch::new("gpu");
    write_qkv(&dir, &[2, 2, 100, 16], 61);
    let lse = dir.path("LSE.npy");
    let lse_s = lse.to_str().unwrap();
    for variant in [&[][..], &["--causal"], &["--queries", "coarse"]] {
        let mut extra = vec!["--block", "8", "--lse", lse_s];
        extra.extend(variant);
        let gpu = cli(run_args(&dir, &extra));
        let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
        if !ci && gpu.code == Some(1) && gpu.stderr.contains("no GPU adapter found") {
            eprintln!("no usable GPU adapter: skipping ({})", gpu.stderr.trim());
            return;
        }
        gpu.assert_ok();
        let o_gpu: ArrayD<f32> = read_npy(dir.path("O.npy")).unwrap();
        let lse_gpu: ArrayD<f32> = read_npy(&lse).unwrap();
        extra.push("--reference");
        cli(run_args(&dir, &extra)).assert_ok();
        let o_ref = to_vec(read_f64(&dir.path("O.npy")));
        let lse_ref = to_vec(read_f64(&lse));
        let o_gpu: Vec<f64> = o_gpu.iter().map(|&x| x as f64).collect();
        let lse_gpu: Vec<f64> = lse_gpu.iter().map(|&x| x as f64).collect();
        assert!(max_abs_diff(&o_gpu, &o_ref) <= 1e-4, "{variant:?}");
        assert!(max_abs_diff(&lse_gpu, &lse_ref) <= 1e-4, "{variant:?}");
    }
}

/// Asking for a backend this machine does not have is a clear error with exit code 1.
#[cfg(target_os = "linux")]
#[test]
fn no_adapter_is_a_clear_error() {
    let dir = Scratch::new("noadapter");
    write_qkv(&dir, &[10, 8], 5);
    let out = Command::new(env!("CARGO_BIN_EXE_multipole-attn"))
        .args(run_args(&dir, &[]))
        .env("WGPU_BACKEND", "metal")
        .output()
        .expect("run multipole-attn");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no GPU adapter found") && stderr.contains("WGPU_BACKEND=metal"),
        "{stderr}"
    );
}

/// K and V with fewer heads than Q (grouped-query attention): the reference path equals the
/// library's, the GPU path matches it within tests/gpu/forward.rs's tolerance, and K/V heads
/// that do not divide Q's are bad input naming both shapes.
#[test]
fn grouped_query_heads_run_and_bad_head_counts_are_bad_input() {
    let dir = Scratch::new("gqa");
    let (q_dims, kv_dims) = ([2, 4, 50, 8], [2, 2, 50, 8]);
    let q = normal_tensor(31, 2 * 4 * 50 * 8);
    let (k, v) = (
        normal_tensor(32, 2 * 2 * 50 * 8),
        normal_tensor(33, 2 * 2 * 50 * 8),
    );
    write_f32(&dir.path("Q.npy"), &q_dims, q.clone());
    write_f32(&dir.path("K.npy"), &kv_dims, k.clone());
    write_f32(&dir.path("V.npy"), &kv_dims, v.clone());
    let shape = Shape::new(2, 4, 50, 8).with_kv_heads(2);
    let want = fma_forward(
        &widen(&q),
        &widen(&k),
        &widen(&v),
        shape,
        &FmaConfig::new(8, 2),
    )
    .unwrap();
    cli(run_args(&dir, &["--reference", "--block", "8"])).assert_ok();
    let o = read_f64(&dir.path("O.npy"));
    assert_eq!(o.shape(), &q_dims);
    assert!(max_abs_diff(&to_vec(o), &want.o) <= 1e-12);
    let gpu = cli(run_args(&dir, &["--block", "8"]));
    if gpu.code == Some(0) {
        let o: ArrayD<f32> = read_npy(dir.path("O.npy")).expect("read O");
        let o: Vec<f64> = o.iter().map(|&x| x as f64).collect();
        assert!(max_abs_diff(&o, &want.o) <= 1e-4);
    } else {
        // Only where no adapter exists, and never under CI.
        let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
        assert!(!ci && gpu.stderr.contains("adapter"), "{}", gpu.stderr);
    }
    write_f32(
        &dir.path("K.npy"),
        &[2, 3, 50, 8],
        normal_tensor(34, 2 * 3 * 50 * 8),
    );
    write_f32(
        &dir.path("V.npy"),
        &[2, 3, 50, 8],
        normal_tensor(35, 2 * 3 * 50 * 8),
    );
    cli(run_args(&dir, &["--reference"])).assert_bad_input(&[
        "3 heads",
        "does not divide",
        "(2, 4, 50, 8)",
        "(2, 3, 50, 8)",
    ]);
}

/// `--seqlens` (packed) and `--lengths` (padded): the reference path equals the library's
/// per-sequence reference, the GPU path matches it, and lengths that do not fit the arrays are
/// bad input saying what is allowed.
#[test]
fn seqlens_and_lengths_run_variable_length_batches() {
    use multipole_attn::cpu::fma_forward_varlen;
    use multipole_attn::Sequences;
    let dir = Scratch::new("varlen");
    let [q, k, v] = write_qkv(&dir, &[1, 2, 60, 8], 41);
    let seqs = Sequences::packed(vec![13, 1, 46]).unwrap();
    let shape = Shape::new(1, 2, 60, 8);
    let cfg = FmaConfig::new(8, 2);
    let want = fma_forward_varlen(&widen(&q), &widen(&k), &widen(&v), shape, &seqs, &cfg).unwrap();
    cli(run_args(
        &dir,
        &["--reference", "--block", "8", "--seqlens", "13,1,46"],
    ))
    .assert_ok();
    let o = read_f64(&dir.path("O.npy"));
    assert!(max_abs_diff(&to_vec(o), &want.o) <= 1e-12);
    let gpu = cli(run_args(&dir, &["--block", "8", "--seqlens", "13,1,46"]));
    if gpu.code == Some(0) {
        let o: ArrayD<f32> = read_npy(dir.path("O.npy")).expect("read O");
        let o: Vec<f64> = o.iter().map(|&x| x as f64).collect();
        assert!(max_abs_diff(&o, &want.o) <= 1e-4);
    } else {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
        assert!(!ci && gpu.stderr.contains("adapter"), "{}", gpu.stderr);
    }
    cli(run_args(&dir, &["--reference", "--seqlens", "13,1,45"]))
        .assert_bad_input(&["sum to 59", "n = 60"]);
    // Empty sequences (repeated cu_seqlens entries) have no rows: 0,13,1,0,46,0 is 13,1,46,
    // bit for bit, on the reference and on the GPU.
    let o_of = |lens: &str, reference: bool| {
        let mut args = vec!["--block", "8", "--seqlens", lens];
        if reference {
            args.push("--reference");
        }
        let out = cli(run_args(&dir, &args));
        (out.code == Some(0)).then(|| match reference {
            true => to_vec(read_f64(&dir.path("O.npy"))),
            false => {
                let o: ArrayD<f32> = read_npy(dir.path("O.npy")).expect("read O");
                o.iter().map(|&x| x as f64).collect()
            }
        })
    };
    assert_eq!(o_of("0,13,1,0,46,0", true), Some(want.o.clone()));
    if let Some(o) = o_of("0,13,1,0,46,0", false) {
        assert_eq!(
            Some(o),
            o_of("13,1,46", false),
            "GPU: empty sequences change nothing"
        );
    }
    cli(run_args(&dir, &["--reference", "--seqlens", "0,0"]))
        .assert_bad_input(&["sum to 0 tokens", "n = 60"]);

    // Padded: two batch rows of 30 tokens, lengths 30 and 7.
    write_qkv(&dir, &[2, 1, 30, 8], 43);
    let lse = dir.path("LSE.npy");
    let lse_arg = lse.to_str().unwrap();
    cli(run_args(
        &dir,
        &[
            "--reference",
            "--block",
            "8",
            "--lengths",
            "30,7",
            "--lse",
            lse_arg,
        ],
    ))
    .assert_ok();
    let o = to_vec(read_f64(&dir.path("O.npy")));
    let l = to_vec(read_f64(&lse));
    assert!(o[(30 + 7) * 8..].iter().all(|&x| x == 0.0), "padding O");
    assert!(
        l[37..].iter().all(|&x| x == f64::NEG_INFINITY),
        "padding LSE"
    );
    assert!(l[..37].iter().all(|x| x.is_finite()));
    cli(run_args(&dir, &["--reference", "--lengths", "30"]))
        .assert_bad_input(&["1 lengths", "2 batch rows"]);
    cli(run_args(&dir, &["--reference", "--lengths", "31,2"]))
        .assert_bad_input(&["length 31", "n = 30"]);
    cli(run_args(&dir, &["--reference", "--seqlens", "20,10"])).assert_bad_input(&[
        "--seqlens",
        "batch 2",
        "--lengths",
    ]);
}

#[test]
fn plan_prints_the_dispatches_with_their_depth_without_a_gpu() {
    use multipole_attn::plan::{
        backward_depths, forward_depths, BackwardPlan, FmaKernel, FmaPlan, KernelLimits, Pass,
    };
    let out = cli([
        "plan",
        "--n",
        "65536",
        "--head-dim",
        "64",
        "--backward",
        "--json",
    ]);
    out.assert_ok();
    let doc: serde_json::Value = serde_json::from_str(&out.stdout).expect("JSON on stdout");
    let got = doc["dispatches"].as_array().expect("a dispatches array");
    // The library's plan of the same problem, in recording order.
    let cfg = FmaConfig::new(64, 2);
    let shape = Shape::new(1, 1, 65536, 64);
    let limits = KernelLimits::discrete_gpu();
    let plan = BackwardPlan::new(shape, &cfg, &limits).unwrap();
    // The forward with the fused pass a GPU runs (the tiled kernel), then the backward.
    let forward = FmaPlan::with_kernel(shape, &cfg, &limits, FmaKernel::Tiled).unwrap();
    assert_eq!(forward.attention.pass, Pass::FineTiled);
    let mut want = forward_depths(&forward, &cfg);
    want.extend(backward_depths(&plan, &cfg));
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g["pass"], w.dispatch.pass.name());
        assert_eq!(g["workgroups"], serde_json::json!(w.dispatch.grid));
        assert_eq!(g["invocations"], w.invocations);
        assert_eq!(g["serial_rows"], w.serial_rows);
        assert_eq!(g["rows"], w.rows);
    }
    // The coarse backward's readers in chunks: no chain near the top level's 3 w_L = 49152.
    let deepest = got.iter().map(|g| g["serial_rows"].as_u64().unwrap()).max();
    assert!(deepest.unwrap() < 1024, "{deepest:?}");
    assert!(got.iter().any(|g| g["pass"] == "backward_dkv_combine"));
    // The table: a header and a line per dispatch.
    let table = cli(["plan", "--n", "1000", "--head-dim", "16", "--causal"]);
    table.assert_ok();
    assert!(table.stdout.starts_with("pass"), "{}", table.stdout);
    assert!(
        table.stdout.contains("fine_attention_tiled"),
        "{}",
        table.stdout
    );
    // A rank that does not divide the block: bad input, as for `run`.
    cli([
        "plan",
        "--n",
        "1000",
        "--head-dim",
        "16",
        "--block",
        "16",
        "--rank",
        "3",
    ])
    .assert_bad_input(&["rank"]);
}

/// `plan --backward --queries coarse` of one head over the binding lists the split backward's
/// dispatches (issue 27): per chunk level 1's coarse-query stats, the other levels' once.
#[test]
fn plan_lists_a_split_coarse_query_backward() {
    let out = cli([
        "plan",
        "--n",
        "16384",
        "--head-dim",
        "64",
        "--queries",
        "coarse",
        "--backward",
        "--binding-mib",
        "1",
        "--json",
    ]);
    out.assert_ok();
    let doc: serde_json::Value = serde_json::from_str(&out.stdout).expect("JSON on stdout");
    let got = doc["dispatches"].as_array().expect("a dispatches array");
    let count = |pass: &str, level: Option<u64>| {
        got.iter()
            .filter(|g| g["pass"] == pass && level.is_none_or(|l| g["level"] == l))
            .count()
    };
    // 16384 tokens of 256 bytes in 1 MiB bindings: 5 chunks of whole blocks of 64 tokens.
    assert_eq!(count("upsample_merge", None), 5);
    assert_eq!(count("backward_delta", None), 5);
    assert_eq!(count("backward_coarse_stats", Some(1)), 5);
    // Levels 2..L (L = 7: windows 64 .. 4096) once, and each level's dQ~ once.
    assert_eq!(count("backward_coarse_stats", None), 5 + 6);
    assert_eq!(count("backward_coarse_dq", None), 7);
    assert_eq!(count("downsample_backward", None), 5);
}

/// A reader that closes the pipe early (`plan ... | head`) ends the output quietly with
/// status 0, as Unix tools do: `println!` panicked there ("failed printing to stdout").
#[test]
fn a_closed_stdout_pipe_ends_quietly() {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_multipole-attn"))
        .args(["plan", "--n", "1048576", "--head-dim", "64", "--backward"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start multipole-attn");
    // Close the pipe's reading end at once: the plan is computed after the process starts,
    // so its first write finds no reader (a table small enough for the pipe's buffer would
    // otherwise be written whole before a late close, and the test could not fail).
    drop(child.stdout.take().expect("piped stdout"));
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("piped stderr")
        .read_to_string(&mut stderr)
        .expect("stderr");
    let status = child.wait().expect("wait for multipole-attn");
    assert_eq!(status.code(), Some(0), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "stderr: {stderr}");
}

/// `plan --dense --backward` of one head over the binding lists the split dense backward's
/// dispatches (issue 27): the forward's (query chunk, key chunk) pairs, then D per query chunk,
/// dK/dV and dQ per causal pair, each with the library's depth; no chain longer than a part.
#[test]
fn plan_lists_a_split_dense_backward() {
    use multipole_attn::plan::{DenseBackwardSplitPlan, KernelLimits};
    let out = cli([
        "plan",
        "--n",
        "16384",
        "--head-dim",
        "64",
        "--dense",
        "--causal",
        "--backward",
        "--binding-mib",
        "1",
        "--json",
    ]);
    out.assert_ok();
    let doc: serde_json::Value = serde_json::from_str(&out.stdout).expect("JSON on stdout");
    let got = doc["dispatches"].as_array().expect("a dispatches array");
    let mut limits = KernelLimits::discrete_gpu();
    limits.max_binding = 1 << 20;
    let plan = DenseBackwardSplitPlan::new((16384, 64, 1), true, &limits, None).unwrap();
    // 16384 rows of 256 bytes in 1 MiB bindings: 4 chunks, 10 causal pairs.
    assert_eq!(plan.chunks.len(), 4);
    let want = plan.depths();
    let backward = &got[got.len() - want.len()..];
    for (g, w) in backward.iter().zip(&want) {
        assert_eq!(g["pass"], w.dispatch.pass.name());
        assert_eq!(g["workgroups"], serde_json::json!(w.dispatch.grid));
        assert_eq!(g["serial_rows"], w.serial_rows);
        assert_eq!(g["rows"], w.rows);
    }
    let count = |pass: &str| got.iter().filter(|g| g["pass"] == pass).count();
    assert_eq!(count("backward_delta"), 4);
    assert_eq!(count("dense_backward_dkv"), 10);
    assert_eq!(count("dense_backward_dq"), 10);
    // The forward's pairs come first: 10 of them.
    assert_eq!(got.len() - want.len(), 10);
    let deepest = got.iter().map(|g| g["serial_rows"].as_u64().unwrap()).max();
    assert!(deepest.unwrap() <= 1 + 3 * 4096, "{deepest:?}");
}
