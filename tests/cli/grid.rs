//! `run --grid H,W` (2D FMA, algorithm.md §9): (H*W, d) and (batch, heads, H*W, d) arrays in
//! raster order on the CPU reference against the library's reference, learned 2D weights
//! (d, p, s_l, s_l) from an .npz, the GPU against the reference when an adapter exists, and
//! exit 2 with a clear message for H*W != n, p not dividing r, --causal with --grid, and 1D
//! weights on a grid; `grad --grid H,W` on the reference and the GPU (both layouts, learned
//! gradients of shape (d, p, s_l, s_l)) and its bad input.

use crate::scratch::Scratch;
use multipole_attn::cpu::{fma_backward, fma_forward, widen};
use multipole_attn::random::normal_tensor;
use multipole_attn::{Downsample, FmaConfig, Grid, LearnedWeights, Shape};
use ndarray::{ArrayD, IxDyn};
use ndarray_npy::{read_npy, write_npy, NpzReader, NpzWriter};
use std::fs::File;
use std::process::{Command, Output};

fn cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_multipole-attn"))
        .args(args)
        .output()
        .expect("run multipole-attn")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Random Q, K, V of `shape` written to the scratch directory.
fn write_qkv(dir: &Scratch, shape: &[usize], seed: u64) -> [Vec<f32>; 3] {
    let len = shape.iter().product();
    let t = [
        normal_tensor(seed, len),
        normal_tensor(seed + 1, len),
        normal_tensor(seed + 2, len),
    ];
    for (name, data) in ["Q.npy", "K.npy", "V.npy"].iter().zip(&t) {
        let a = ArrayD::from_shape_vec(IxDyn(shape), data.clone()).unwrap();
        write_npy(dir.arg(name), &a).unwrap();
    }
    t
}

fn run_args<'a>(dir: &'a [String; 4], extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "run", "--q", &dir[0], "--k", &dir[1], "--v", &dir[2], "--out", &dir[3],
    ];
    a.extend_from_slice(extra);
    a
}

fn files(dir: &Scratch) -> [String; 4] {
    ["Q.npy", "K.npy", "V.npy", "O.npy"].map(|f| dir.arg(f))
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn grid_reference_matches_the_library_for_both_layouts() {
    let dir = Scratch::new("ref");
    let f = files(&dir);
    for (shape, lib) in [
        (vec![13 * 9, 4], Shape::new(1, 1, 117, 4)),
        (vec![2, 3, 13 * 9, 4], Shape::new(2, 3, 117, 4)),
    ] {
        let [q, k, v] = write_qkv(&dir, &shape, 7);
        let out = cli(&run_args(
            &f,
            &[
                "--reference",
                "--grid",
                "13,9",
                "--block",
                "2",
                "--rank",
                "2",
            ],
        ));
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let o: ArrayD<f64> = read_npy(&f[3]).unwrap();
        assert_eq!(o.shape(), &shape[..]);
        let cfg = FmaConfig::new(2, 2).grid(Some(Grid::new(13, 9)));
        let want = fma_forward(&widen(&q), &widen(&k), &widen(&v), lib, &cfg).unwrap();
        let got: Vec<f64> = o.iter().copied().collect();
        assert!(max_abs_diff(&got, &want.o) <= 1e-12);
    }
}

#[test]
fn learned_2d_weights_are_read_with_their_shape() {
    let dir = Scratch::new("weights");
    let f = files(&dir);
    let [q, k, v] = write_qkv(&dir, &[20 * 12, 3], 3);
    let grid = Grid::new(20, 12);
    let mut w = LearnedWeights::box_init_grid_for(3, 2, 2, grid);
    assert_eq!(w.levels.len(), 3);
    w.levels[1].bk[0] = 0.5;
    let write = |path: &str, square: bool| {
        let mut npz = NpzWriter::new(File::create(path).unwrap());
        for (l, lw) in w.levels.iter().enumerate() {
            let s = 2usize << l;
            let wshape = if square {
                vec![3, 2, s, s]
            } else {
                vec![3, 2, s * s]
            };
            for (name, data, shape) in [
                ("k_w", &lw.wk, wshape.clone()),
                ("k_b", &lw.bk, vec![3, 2]),
                ("v_w", &lw.wv, wshape.clone()),
                ("v_b", &lw.bv, vec![3, 2]),
            ] {
                let a = ArrayD::from_shape_vec(IxDyn(&shape), data.clone()).unwrap();
                npz.add_array(format!("{name}{}", l + 1), &a).unwrap();
            }
        }
        npz.finish().unwrap();
    };
    let wpath = dir.arg("W.npz");
    write(&wpath, true);
    let args = [
        "--reference",
        "--grid",
        "20,12",
        "--block",
        "2",
        "--rank",
        "2",
        "--weights",
        &wpath,
    ];
    let out = cli(&run_args(&f, &args));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let o: ArrayD<f64> = read_npy(&f[3]).unwrap();
    let cfg = FmaConfig::new(2, 2)
        .grid(Some(grid))
        .downsample(Downsample::Learned(w.clone()));
    let want = fma_forward(
        &widen(&q),
        &widen(&k),
        &widen(&v),
        Shape::new(1, 1, 240, 3),
        &cfg,
    )
    .unwrap();
    let got: Vec<f64> = o.iter().copied().collect();
    assert!(max_abs_diff(&got, &want.o) <= 1e-12);
    // The 1D layout (d, p, s_l^2) of the same numbers is bad input naming the key and shape.
    write(&wpath, false);
    let out = cli(&run_args(&f, &args));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("k_w1") && stderr(&out).contains("(3, 2, 2, 2)"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn grids_that_do_not_fit_are_bad_input() {
    let dir = Scratch::new("bad");
    let f = files(&dir);
    write_qkv(&dir, &[35, 4], 1);
    for (extra, needle) in [
        (&["--grid", "5,6"][..], "5x6 = 30 tokens"),
        (
            &["--grid", "7,5", "--block", "4", "--rank", "3"],
            "p divides",
        ),
        (
            &["--grid", "7,5", "--causal"],
            "causal mask is not defined on a 2D grid",
        ),
        (&["--grid", "7"], "expected H,W"),
        (&["--grid", "0,35"], "expected H,W"),
    ] {
        for reference in [true, false] {
            let mut args = extra.to_vec();
            if reference {
                args.push("--reference");
            }
            let out = cli(&run_args(&f, &args));
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(2), "{extra:?}: {err}");
            assert!(err.contains(needle), "{extra:?}: {err}");
        }
    }
}

/// With an adapter, `run --grid` on the GPU agrees with the reference to f32 accuracy (skips
/// when none is found, except under CI=true).
#[test]
fn grid_gpu_matches_the_reference_when_an_adapter_exists() {
    let dir = Scratch::new("gpu");
    let f = files(&dir);
    write_qkv(&dir, &[2, 1, 21 * 17, 8], 9);
    let extra = ["--grid", "21,17", "--block", "4", "--rank", "2"];
    let gpu = cli(&run_args(&f, &extra));
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    if !ci && gpu.status.code() == Some(1) && stderr(&gpu).contains("no GPU adapter found") {
        eprintln!("no usable GPU adapter: skipping");
        return;
    }
    assert_eq!(gpu.status.code(), Some(0), "{}", stderr(&gpu));
    let o_gpu: ArrayD<f32> = read_npy(&f[3]).unwrap();
    let mut with_ref = extra.to_vec();
    with_ref.push("--reference");
    let out = cli(&run_args(&f, &with_ref));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let o_ref: ArrayD<f64> = read_npy(&f[3]).unwrap();
    let o_gpu: Vec<f64> = o_gpu.iter().map(|&x| x as f64).collect();
    let o_ref: Vec<f64> = o_ref.iter().copied().collect();
    // f32 against f64 on N(0, 1) inputs: a few 1e-6 (tests/gpu/grid.rs says why).
    assert!(max_abs_diff(&o_gpu, &o_ref) <= 1e-4);
}

/// Writes dO of `shape` to the scratch directory; returns it.
fn write_dout(dir: &Scratch, shape: &[usize], seed: u64) -> Vec<f32> {
    let dout = normal_tensor(seed, shape.iter().product());
    let a = ArrayD::from_shape_vec(IxDyn(shape), dout.clone()).unwrap();
    write_npy(dir.arg("DO.npy"), &a).unwrap();
    dout
}

fn grad_args<'a>(
    f: &'a [String; 4],
    dpath: &'a str,
    gpath: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut a = vec![
        "grad", "--q", &f[0], "--k", &f[1], "--v", &f[2], "--dout", dpath, "--out", gpath,
    ];
    a.extend_from_slice(extra);
    a
}

/// Reads array `name` of the gradients .npz as f64 (the GPU writes f32, the reference f64).
fn npz_array(path: &str, name: &str, f32_data: bool) -> ArrayD<f64> {
    let mut npz = NpzReader::new(File::open(path).unwrap()).unwrap();
    if f32_data {
        let a: ArrayD<f32> = npz.by_name(name).unwrap();
        a.mapv(|x| x as f64)
    } else {
        npz.by_name(name).unwrap()
    }
}

/// |gpu - ref| <= 2e-4 of the tensor's scale (max(1, max |ref|)): tests/gpu/grid_backward.rs
/// says why.
fn assert_close_to_scale(name: &str, got: &ArrayD<f64>, want: &[f64]) {
    let got: Vec<f64> = got.iter().copied().collect();
    let scale = want.iter().fold(1.0f64, |m, x| m.max(x.abs()));
    let err = max_abs_diff(&got, want);
    assert!(err <= 2e-4 * scale, "{name}: {err:e} of scale {scale:e}");
}

/// `grad --grid` on the reference gives the 2D reference gradients (the learned ones with the
/// (d, p, s_l, s_l) shape of the weights), and on the GPU the same to f32 accuracy, for the
/// (H*W, d) and (batch, heads, H*W, d) layouts (the GPU part skips when no adapter is found,
/// except under CI=true).
#[test]
fn grad_on_a_grid_runs_on_the_reference_and_the_gpu() {
    let dir = Scratch::new("grad");
    let f = files(&dir);
    let (dpath, gpath) = (dir.arg("DO.npy"), dir.arg("G.npz"));
    let grid = Grid::new(9, 7);
    for (layout, lib, learned) in [
        (vec![9 * 7, 2], Shape::new(1, 1, 63, 2), true),
        (vec![2, 3, 9 * 7, 4], Shape::new(2, 3, 63, 4), false),
    ] {
        let [q, k, v] = write_qkv(&dir, &layout, 5);
        let dout = write_dout(&dir, &layout, 50);
        let mut extra = vec!["--grid", "9,7", "--block", "2", "--rank", "2"];
        let mut cfg = FmaConfig::new(2, 2).grid(Some(grid));
        if learned {
            extra.extend(["--downsample", "learned"]);
            let d = lib.head_dim;
            let w = LearnedWeights::box_init_grid_for(d, 2, 2, grid);
            cfg = cfg.downsample(Downsample::Learned(w));
        }
        let want =
            fma_backward(&widen(&q), &widen(&k), &widen(&v), &widen(&dout), lib, &cfg).unwrap();
        let mut with_ref = extra.clone();
        with_ref.push("--reference");
        let out = cli(&grad_args(&f, &dpath, &gpath, &with_ref));
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let dq = npz_array(&gpath, "dq", false);
        assert_eq!(dq.shape(), &layout[..]);
        let got: Vec<f64> = dq.iter().copied().collect();
        assert!(max_abs_diff(&got, &want.dq) <= 1e-12);
        if learned {
            let kw2 = npz_array(&gpath, "k_w2", false);
            assert_eq!(kw2.shape(), &[2, 2, 4, 4]);
            let got: Vec<f64> = kw2.iter().copied().collect();
            assert!(max_abs_diff(&got, &want.weights.as_ref().unwrap()[1].wk) <= 1e-12);
        }

        let out = cli(&grad_args(&f, &dpath, &gpath, &extra));
        let err = stderr(&out);
        let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
        if !ci && out.status.code() == Some(1) && err.contains("no GPU adapter found") {
            eprintln!("no usable GPU adapter: skipping the GPU");
            return;
        }
        assert_eq!(out.status.code(), Some(0), "{err}");
        for (name, want) in [("dq", &want.dq), ("dk", &want.dk), ("dv", &want.dv)] {
            let got = npz_array(&gpath, name, true);
            assert_eq!(got.shape(), &layout[..], "{name}");
            assert_close_to_scale(name, &got, want);
        }
        if learned {
            let w = want.weights.as_ref().unwrap();
            for (l, lw) in w.iter().enumerate() {
                let s = 2 << l;
                let kw = npz_array(&gpath, &format!("k_w{}", l + 1), true);
                assert_eq!(kw.shape(), &[2, 2, s, s]);
                assert_close_to_scale("k_w", &kw, &lw.wk);
                let vb = npz_array(&gpath, &format!("v_b{}", l + 1), true);
                assert_close_to_scale("v_b", &vb, &lw.bv);
            }
        }
    }
}

/// `grad` with a grid that does not fit the input, p not dividing r, or --causal: exit 2 with
/// the message of `run`, on the reference and on the GPU.
#[test]
fn grad_grids_that_do_not_fit_are_bad_input() {
    let dir = Scratch::new("grad-bad");
    let f = files(&dir);
    let (dpath, gpath) = (dir.arg("DO.npy"), dir.arg("G.npz"));
    write_qkv(&dir, &[35, 4], 1);
    write_dout(&dir, &[35, 4], 2);
    for (extra, needle) in [
        (&["--grid", "5,6"][..], "5x6 = 30 tokens"),
        (
            &["--grid", "7,5", "--block", "4", "--rank", "3"],
            "p divides",
        ),
        (
            &["--grid", "7,5", "--causal"],
            "causal mask is not defined on a 2D grid",
        ),
    ] {
        for reference in [true, false] {
            let mut args = extra.to_vec();
            if reference {
                args.push("--reference");
            }
            let out = cli(&grad_args(&f, &dpath, &gpath, &args));
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(2), "{extra:?}: {err}");
            assert!(err.contains(needle), "{extra:?}: {err}");
        }
    }
}

/// Runs `plan` with `args` (a 2D head of (n, d) over `--binding-mib 1`, `--backward --json`)
/// and checks its dispatches against the library's list for `cfg` under the same limits, pass,
/// workgroups and serial rows in order (the forward's fused pass as a GPU runs it: the tiled
/// kernel, as `plan` prints). Returns the dispatches and the limits.
fn plan_matches_the_library(
    args: &[&str],
    cfg: &FmaConfig,
    (n, d): (usize, usize),
) -> (Vec<serde_json::Value>, multipole_attn::plan::KernelLimits) {
    use multipole_attn::plan::{fma_depths_with, FmaKernel, KernelLimits};
    use multipole_attn::Problem;
    let out = cli(args);
    assert!(out.status.success(), "{}", stderr(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    let got = doc["dispatches"]
        .as_array()
        .expect("a dispatches array")
        .clone();
    let mut limits = KernelLimits::discrete_gpu();
    limits.max_binding = 1 << 20;
    let problem = Problem::new(Shape::new(1, 1, n, d));
    let want = fma_depths_with(&problem, cfg, &limits, true, FmaKernel::Tiled).unwrap();
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g["pass"], w.dispatch.pass.name());
        assert_eq!(g["workgroups"], serde_json::json!(w.dispatch.grid));
        assert_eq!(g["serial_rows"], w.serial_rows);
    }
    (got, limits)
}

/// `plan --grid H,W --backward --binding-mib 1` of a 2D head whose coarse dK~/dV~ partial
/// sums exceed the binding (issue 27): the library's list, each level's coarse pass in groups
/// of rows (each chunk the groups its tokens may read), not the binding error.
#[test]
fn plan_lists_a_split_grid_backward_in_groups_of_coarse_rows() {
    use multipole_attn::plan::BackwardSplitPlan;
    // 320 x 640 tokens of width 4, r = 4, p = 2: the partial sums of 27 reader cells a row
    // (about 27 n p / 256 rows) outgrow 1 MiB after dK~'s rows.
    let args = [
        "plan",
        "--n",
        "204800",
        "--head-dim",
        "4",
        "--grid",
        "320,640",
        "--block",
        "4",
        "--rank",
        "2",
        "--backward",
        "--binding-mib",
        "1",
        "--json",
    ];
    let cfg = FmaConfig::new(4, 2).grid(Some(Grid::new(320, 640)));
    let (got, limits) = plan_matches_the_library(&args, &cfg, (204800, 4));
    let plan = BackwardSplitPlan::new(204800, 4, &cfg, &limits).unwrap();
    let groups: usize = plan.dkv_groups.iter().map(Vec::len).sum();
    assert!(groups > plan.dkv_groups.len(), "no level in groups");
    let count = got
        .iter()
        .filter(|g| g["pass"] == "backward_dkv_coarse")
        .count();
    // Each group's pass in the chunks whose tokens may read its rows (the first in all).
    let runs: usize = plan
        .dkv_groups
        .iter()
        .flatten()
        .map(|g| g.chunks.iter().flatten().count())
        .sum();
    assert!(runs < plan.chunks.len() * groups, "no chunk skips a group");
    assert_eq!(count, runs);
}

/// `plan --grid H,W --backward` of one 2D head over a small binding (`--binding-mib 1`): the
/// split backward's dispatches chunk by chunk (issue 27), the library's list, not the binding
/// error; and the grid's bad input as for `run`.
#[test]
fn plan_lists_a_split_grid_head_backward_per_chunk() {
    use multipole_attn::plan::BackwardSplitPlan;
    // 128 x 160 tokens of width 16: 1.31 MB per tensor over a 1 MiB binding.
    let args = [
        "plan",
        "--n",
        "20480",
        "--head-dim",
        "16",
        "--grid",
        "128,160",
        "--block",
        "8",
        "--rank",
        "2",
        "--backward",
        "--binding-mib",
        "1",
        "--json",
    ];
    let cfg = FmaConfig::new(8, 2).grid(Some(Grid::new(128, 160)));
    let (got, limits) = plan_matches_the_library(&args, &cfg, (20480, 16));
    let chunks = BackwardSplitPlan::new(20480, 16, &cfg, &limits)
        .unwrap()
        .chunks
        .len();
    assert!(chunks > 1);
    for pass in [
        "backward_delta",
        "backward_dq",
        "backward_dkv_fine",
        "downsample_backward",
    ] {
        let count = got.iter().filter(|g| g["pass"] == pass).count();
        assert_eq!(count, chunks, "{pass}");
    }
    // n must be H*W, as for `run`.
    let bad = cli(&[
        "plan",
        "--n",
        "20000",
        "--head-dim",
        "16",
        "--grid",
        "128,160",
    ]);
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    assert!(stderr(&bad).contains("128x160"), "{}", stderr(&bad));
}
