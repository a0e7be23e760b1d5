//! `multipole-attn decode`: the f64 CPU decode mirror (`--reference`) equals `run --causal
//! --reference` (both f64, the same keys summed in the same order: to 1e-12), the GPU decode
//! (FMA and `--dense`) equals them to f32 accuracy (5e-5 + 5e-5 |ref|, as the GPU tests), and
//! bad input exits with 2 and says what is wrong. The softmax variants (--softcap, --sinks,
//! --window) likewise: decode equals `run --causal` with the same flags, on both paths.

use crate::scratch::Scratch;
use multipole_attn::random::normal_tensor;
use ndarray::{ArrayD, IxDyn};
use ndarray_npy::{read_npy, write_npy, NpzWriter};
use std::process::Command;

/// Runs the binary: (exit code, stdout, stderr).
fn cli(args: &[String]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_multipole-attn"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `cmd --q Q --k K --v V --out out` in `dir`, then `extra`.
fn args(dir: &Scratch, cmd: &str, out: &str, extra: &[&str]) -> Vec<String> {
    let mut a = vec![cmd.to_string()];
    for (flag, file) in [
        ("--q", "Q.npy"),
        ("--k", "K.npy"),
        ("--v", "V.npy"),
        ("--out", out),
    ] {
        a.push(flag.into());
        a.push(dir.arg(file));
    }
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn write_qkv(dir: &Scratch, shape: &[usize], seed: u64) {
    let len = shape.iter().product();
    for (i, name) in ["Q.npy", "K.npy", "V.npy"].iter().enumerate() {
        let a = ArrayD::from_shape_vec(IxDyn(shape), normal_tensor(seed + i as u64, len)).unwrap();
        write_npy(dir.arg(name), &a).unwrap();
    }
}

fn read(dir: &Scratch, name: &str) -> Vec<f64> {
    if let Ok(a) = read_npy::<_, ArrayD<f64>>(dir.arg(name)) {
        return a.iter().copied().collect();
    }
    let a: ArrayD<f32> = read_npy(dir.arg(name)).unwrap();
    a.iter().map(|&x| x as f64).collect()
}

fn assert_close(got: &[f64], want: &[f64], atol: f64, rtol: f64, label: &str) {
    assert_eq!(got.len(), want.len(), "{label}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= atol + rtol * w.abs(),
            "{label}: element {i}: {g} vs {w}"
        );
    }
}

fn ok(r: &(Option<i32>, String, String)) {
    assert_eq!(r.0, Some(0), "stderr: {}", r.2);
}

#[test]
fn the_decode_mirror_equals_the_causal_forward() {
    let dir = Scratch::new("mirror");
    write_qkv(&dir, &[2, 1, 70, 5], 41);
    let opts = ["--block", "4", "--rank", "2", "--reference"];
    ok(&cli(&args(
        &dir,
        "run",
        "R.npy",
        &[&opts[..], &["--causal"]].concat(),
    )));
    ok(&cli(&args(
        &dir,
        "decode",
        "D.npy",
        &[&opts[..], &["--prefill", "9", "--chunk", "4"]].concat(),
    )));
    assert_close(
        &read(&dir, "D.npy"),
        &read(&dir, "R.npy"),
        1e-12,
        0.0,
        "decode --reference",
    );
}

#[test]
fn gpu_decoding_equals_the_causal_forward() {
    let dir = Scratch::new("gpu");
    write_qkv(&dir, &[1, 2, 97, 16], 7);
    let opts = ["--block", "8", "--rank", "2"];
    ok(&cli(&args(
        &dir,
        "run",
        "R.npy",
        &[&opts[..], &["--causal", "--reference"]].concat(),
    )));
    ok(&cli(&args(
        &dir,
        "run",
        "E.npy",
        &["--dense", "--causal", "--reference"],
    )));
    let fma = cli(&args(
        &dir,
        "decode",
        "D.npy",
        &[&opts[..], &["--prefill", "30", "--chunk", "3"]].concat(),
    ));
    if fma.0 == Some(1)
        && fma.2.contains("no GPU adapter")
        && std::env::var("CI").as_deref() != Ok("true")
    {
        eprintln!("skipping: {}", fma.2);
        return;
    }
    ok(&fma);
    assert!(fma.1.contains("tokens/s"), "{}", fma.1);
    assert_close(
        &read(&dir, "D.npy"),
        &read(&dir, "R.npy"),
        5e-5,
        5e-5,
        "decode",
    );
    ok(&cli(&args(
        &dir,
        "decode",
        "X.npy",
        &["--dense", "--prefill", "0"],
    )));
    assert_close(
        &read(&dir, "X.npy"),
        &read(&dir, "E.npy"),
        5e-5,
        5e-5,
        "decode --dense",
    );
}

#[test]
fn bad_decode_input_exits_with_2() {
    let dir = Scratch::new("bad");
    write_qkv(&dir, &[40, 4], 3);
    for (extra, needle) in [
        (&["--prefill", "41"][..], "longer than the sequence"),
        (&["--prefill", "4", "--chunk", "0"][..], "at least 1"),
        (&["--prefill", "4", "--queries", "coarse"][..], "causal"),
        (
            &["--prefill", "4", "--rank", "3", "--block", "4"][..],
            "rank",
        ),
    ] {
        let r = cli(&args(&dir, "decode", "O.npy", extra));
        assert_eq!(r.0, Some(2), "{extra:?}: {}", r.2);
        assert!(
            r.2.starts_with("error: ") && r.2.contains(needle),
            "{extra:?}: {}",
            r.2
        );
    }
    // Weights for level 1 only; 40 tokens with m = 4 use 3 levels.
    let mut npz = NpzWriter::new(std::fs::File::create(dir.arg("W.npz")).unwrap());
    for (key, shape) in [
        ("k_w1", vec![4, 2, 4]),
        ("k_b1", vec![4, 2]),
        ("v_w1", vec![4, 2, 4]),
        ("v_b1", vec![4, 2]),
    ] {
        let n = shape.iter().product();
        npz.add_array(
            key,
            &ArrayD::from_shape_vec(IxDyn(&shape), vec![0.1f32; n]).unwrap(),
        )
        .unwrap();
    }
    npz.finish().unwrap();
    let w = dir.arg("W.npz");
    let r = cli(&args(
        &dir,
        "decode",
        "O.npy",
        &["--prefill", "4", "--block", "4", "--weights", &w],
    ));
    assert_eq!(r.0, Some(2), "{}", r.2);
    assert!(r.2.contains("level"), "{}", r.2);
}

/// `a` then `b`.
fn join<'a>(a: &[&'a str], b: &[&'a str]) -> Vec<&'a str> {
    [a, b].concat()
}

/// `decode --softcap/--sinks/--window` (alone and combined, FMA and --dense) equals `run
/// --causal` with the same flags: the f64 mirror to 1e-12, the GPU to f32 accuracy (the
/// tolerance of the GPU tests); what does not combine exits with 2 and says why.
#[test]
fn decode_takes_the_softmax_variants() {
    let dir = Scratch::new("variants");
    write_qkv(&dir, &[1, 2, 61, 8], 19);
    let sinks = ArrayD::from_shape_vec(IxDyn(&[2]), vec![0.8f32, -1.3]).unwrap();
    write_npy(dir.arg("S.npy"), &sinks).unwrap();
    let s = dir.arg("S.npy");
    let block = ["--block", "8", "--rank", "2"];
    let mut gpu = true;
    for (i, flags) in [
        vec!["--softcap", "1.5"],
        vec!["--sinks", &s],
        vec!["--window", "6,0"],
        vec!["--sinks", &s, "--window", "8,0"],
        vec!["--softcap", "2", "--sinks", &s, "--window", "5,0"],
    ]
    .into_iter()
    .enumerate()
    {
        for dense in [false, true] {
            let label = format!("{flags:?} dense {dense}");
            // --block and --rank are FMA's (clap refuses them with --dense).
            let opts: Vec<&str> = if dense {
                join(&flags, &["--dense"])
            } else {
                join(&block, &flags)
            };
            let (r, d, g) = (
                format!("R{i}{dense}.npy"),
                format!("D{i}{dense}.npy"),
                format!("G{i}{dense}.npy"),
            );
            let with = |extra: &[&'static str]| join(&opts, extra);
            ok(&cli(&args(
                &dir,
                "run",
                &r,
                &with(&["--causal", "--reference"]),
            )));
            ok(&cli(&args(
                &dir,
                "decode",
                &d,
                &with(&["--reference", "--prefill", "7", "--chunk", "3"]),
            )));
            assert_close(&read(&dir, &d), &read(&dir, &r), 1e-12, 0.0, &label);
            if !gpu {
                continue;
            }
            let out = cli(&args(
                &dir,
                "decode",
                &g,
                &with(&["--prefill", "7", "--chunk", "3"]),
            ));
            if out.0 == Some(1)
                && out.2.contains("no GPU adapter")
                && std::env::var("CI").as_deref() != Ok("true")
            {
                eprintln!("skipping the GPU: {}", out.2);
                gpu = false;
                continue;
            }
            ok(&out);
            assert_close(&read(&dir, &g), &read(&dir, &r), 5e-5, 5e-5, &label);
        }
    }
    for (extra, needle) in [
        (&["--window", "3,1"][..], "R must be 0"),
        (
            &["--window", "9,0", "--block", "8"][..],
            "choose a block m >= 9",
        ),
    ] {
        let r = cli(&args(
            &dir,
            "decode",
            "O.npy",
            &[extra, &["--prefill", "4", "--reference"]].concat(),
        ));
        assert_eq!(r.0, Some(2), "{extra:?}: {}", r.2);
        assert!(
            r.2.starts_with("error: ") && r.2.contains(needle),
            "{extra:?}: {}",
            r.2
        );
    }
    // The dense decode takes a window wider than FMA's block.
    ok(&cli(&args(
        &dir,
        "decode",
        "O.npy",
        &[
            "--window",
            "9,0",
            "--dense",
            "--prefill",
            "4",
            "--reference",
        ],
    )));
}
