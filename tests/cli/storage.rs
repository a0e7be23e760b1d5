//! `--storage f16|f32` (issue 29): `run` with f16 storage takes float16, float32 and float64
//! inputs, writes O as float16 and matches the f64 reference on the f16-rounded inputs within
//! the f16 tolerance (tests/gpu/f16.rs: 5e-5 + (5e-5 + 2^-11) |ref|); `decode` with f16
//! storage writes float16 rows within that bound of its f64 reference and next to
//! `run --causal --storage f16`'s; the typed errors of an adapter without SHADER_F16 and of
//! `--reference`.

use crate::scratch::Scratch;
use multipole_attn::random::normal_tensor;
use multipole_attn::storage::round_to_f16;
use ndarray::{ArrayD, IxDyn};
use ndarray_npy::{read_npy, write_npy};
use std::path::Path;
use std::process::{Command, Output};

fn cli(args: &[String], backend: Option<&str>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_multipole-attn"));
    c.args(args);
    if let Some(b) = backend {
        c.env("WGPU_BACKEND", b);
    }
    c.output().expect("run multipole-attn")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Whether the run found no adapter (the GPU tests then skip, except under CI).
fn no_adapter(o: &Output) -> bool {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    !ci && o.status.code() == Some(1) && stderr(o).contains("no GPU adapter found")
}

fn write_f32(path: &Path, shape: &[usize], data: &[f32]) {
    let arr = ArrayD::from_shape_vec(IxDyn(shape), data.to_vec()).expect("shape");
    write_npy(path, &arr).expect("write npy");
}

/// A float16 .npy file of `values` (little-endian, numpy's version 1.0 layout).
fn write_f16(path: &Path, shape: &[usize], values: &[f32]) {
    let dims: Vec<String> = shape.iter().map(|s| format!("{s}, ")).collect();
    let mut header = format!(
        "{{'descr': '<f2', 'fortran_order': False, 'shape': ({}), }}",
        dims.concat()
    );
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((header.len() as u16).to_le_bytes());
    bytes.extend(header.as_bytes());
    for &v in values {
        bytes.extend(half::f16::from_f32(v).to_le_bytes());
    }
    std::fs::write(path, bytes).expect("write f16 npy");
}

/// A float16 .npy file's shape and values (as f32), checking its header says '<f2'.
fn read_f16(path: &Path) -> (Vec<usize>, Vec<f32>) {
    parse_f16(&std::fs::read(path).expect("read output"))
}

/// [`read_f16`] of the bytes of an .npy file.
fn parse_f16(bytes: &[u8]) -> (Vec<usize>, Vec<f32>) {
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00", "not npy 1.0");
    let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + len]).unwrap();
    assert!(header.contains("'descr': '<f2'"), "{header}");
    assert_eq!((10 + len) % 64, 0, "{header}");
    let dims = header
        .split("'shape': (")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap();
    let shape = dims
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().unwrap())
        .collect();
    let values = bytes[10 + len..]
        .chunks_exact(2)
        .map(|p| half::f16::from_le_bytes([p[0], p[1]]).to_f32())
        .collect();
    (shape, values)
}

fn run_args(dir: &Scratch, q: &str, k: &str, v: &str, extra: &[&str]) -> Vec<String> {
    let mut a = vec!["run".to_string()];
    for (flag, file) in [("--q", q), ("--k", k), ("--v", v), ("--out", "O.npy")] {
        a.push(flag.into());
        a.push(dir.arg(file));
    }
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

#[test]
fn run_with_f16_storage_matches_the_reference_and_writes_float16() {
    let dir = Scratch::new("storage-f16");
    let shape = [1, 2, 77, 12];
    let len: usize = shape.iter().product();
    let names = ["Q", "K", "V"];
    for (i, name) in names.iter().enumerate() {
        let x = normal_tensor(700 + i as u64, len);
        write_f32(&dir.path(&format!("{name}32.npy")), &shape, &x);
        // The same values rounded to f16: as float16, and as float32 for the reference.
        let r = round_to_f16(&x);
        write_f16(&dir.path(&format!("{name}16.npy")), &shape, &r);
        write_f32(&dir.path(&format!("{name}r.npy")), &shape, &r);
    }
    for method in [
        &["--block", "8"][..],
        &["--block", "8", "--causal"],
        &["--dense"],
    ] {
        let mut outs = Vec::new();
        for suffix in ["32", "16"] {
            let [q, k, v] = names.map(|n| format!("{n}{suffix}.npy"));
            let mut extra = method.to_vec();
            extra.extend(["--storage", "f16"]);
            let out = cli(&run_args(&dir, &q, &k, &v, &extra), None);
            if no_adapter(&out) {
                eprintln!("no usable GPU adapter: skipping");
                return;
            }
            if out.status.code() == Some(1) && stderr(&out).contains("SHADER_F16") {
                eprintln!("adapter without SHADER_F16: skipping");
                return;
            }
            assert!(out.status.success(), "{method:?}: {}", stderr(&out));
            let (got_shape, o) = read_f16(&dir.path("O.npy"));
            assert_eq!(got_shape, shape);
            outs.push(o);
        }
        // float32 inputs are rounded to the f16 values of the float16 file: the same result.
        assert_eq!(outs[0], outs[1], "{method:?}");
        let mut extra = method.to_vec();
        extra.push("--reference");
        let out = cli(&run_args(&dir, "Qr.npy", "Kr.npy", "Vr.npy", &extra), None);
        assert!(out.status.success(), "{}", stderr(&out));
        let want: ArrayD<f64> = read_npy(dir.path("O.npy")).unwrap();
        let rtol = 5e-5 + 1.0 / 2048.0;
        for (g, w) in outs[0].iter().zip(want.iter()) {
            let err = (*g as f64 - w).abs();
            assert!(err <= 5e-5 + rtol * w.abs(), "{method:?}: {g} vs {w}");
        }
    }
}

#[test]
fn f16_storage_errors_are_typed() {
    let dir = Scratch::new("storage-errors");
    let x = normal_tensor(9, 40 * 8);
    for n in ["Q", "K", "V"] {
        write_f32(&dir.path(&format!("{n}.npy")), &[40, 8], &x);
    }
    // f16 storage is a GPU choice: not with the f64 reference (clap's usage error, exit 2).
    let out = cli(
        &run_args(
            &dir,
            "Q.npy",
            "K.npy",
            "V.npy",
            &["--storage", "f16", "--reference"],
        ),
        None,
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = cli(
        &run_args(&dir, "Q.npy", "K.npy", "V.npy", &["--storage", "bf16"]),
        None,
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("f16"), "{}", stderr(&out));
    // An adapter without SHADER_F16 (wgpu's GL backend on llvmpipe has none): exit 1, naming
    // the feature and the way out.
    let out = cli(
        &run_args(
            &dir,
            "Q.npy",
            "K.npy",
            "V.npy",
            &["--storage", "f16", "--dense"],
        ),
        Some("gl"),
    );
    if no_adapter(&out) || out.status.success() {
        eprintln!("no GL adapter without SHADER_F16 here: skipping that case");
        return;
    }
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(e.contains("SHADER_F16") && e.contains("f32"), "{e}");
    // decode likewise.
    let mut args = run_args(&dir, "Q.npy", "K.npy", "V.npy", &["--storage", "f16"]);
    args[0] = "decode".into();
    args.extend(["--prefill".into(), "20".into()]);
    let out = cli(&args, Some("gl"));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(e.contains("SHADER_F16") && e.contains("f32"), "{e}");
}

/// `decode --storage f16` (FMA and --dense, a prefill and steps of 4 tokens): O written as
/// float16, the same from float16 and float32 inputs, within the f16 bound of the f64
/// reference on the rounded inputs (decode --reference), and within one f16 rounding of
/// `run --causal --storage f16` (both round an f32 result once: 2^-10 |x| apart at most,
/// plus the f32 paths' 5e-5 + 5e-5 |x| each).
#[test]
fn decode_with_f16_storage_matches_run_and_the_reference() {
    let dir = Scratch::new("storage-f16-decode");
    let shape = [1, 2, 45, 12];
    let len: usize = shape.iter().product();
    let names = ["Q", "K", "V"];
    for (i, name) in names.iter().enumerate() {
        let x = normal_tensor(900 + i as u64, len);
        write_f32(&dir.path(&format!("{name}32.npy")), &shape, &x);
        let r = round_to_f16(&x);
        write_f16(&dir.path(&format!("{name}16.npy")), &shape, &r);
        write_f32(&dir.path(&format!("{name}r.npy")), &shape, &r);
    }
    let steps = ["--prefill", "13", "--chunk", "4"];
    for method in [&["--block", "8"][..], &["--dense"]] {
        let mut outs = Vec::new();
        for suffix in ["32", "16"] {
            let [q, k, v] = names.map(|n| format!("{n}{suffix}.npy"));
            let mut args = run_args(&dir, &q, &k, &v, method);
            args[0] = "decode".into();
            args.extend(steps.iter().map(|s| s.to_string()));
            args.extend(["--storage".into(), "f16".into()]);
            let out = cli(&args, None);
            if no_adapter(&out) {
                eprintln!("no usable GPU adapter: skipping");
                return;
            }
            if out.status.code() == Some(1) && stderr(&out).contains("SHADER_F16") {
                eprintln!("adapter without SHADER_F16: skipping");
                return;
            }
            assert!(out.status.success(), "{method:?}: {}", stderr(&out));
            let (got_shape, o) = read_f16(&dir.path("O.npy"));
            assert_eq!(got_shape, shape);
            outs.push(o);
        }
        assert_eq!(outs[0], outs[1], "{method:?}");
        // run --causal --storage f16 on the same inputs.
        let mut extra = method.to_vec();
        extra.extend(["--causal", "--storage", "f16"]);
        let out = cli(
            &run_args(&dir, "Q16.npy", "K16.npy", "V16.npy", &extra),
            None,
        );
        assert!(out.status.success(), "{}", stderr(&out));
        let (_, ran) = read_f16(&dir.path("O.npy"));
        // The f64 reference of the decoder on the rounded inputs.
        let mut args = run_args(&dir, "Qr.npy", "Kr.npy", "Vr.npy", method);
        args[0] = "decode".into();
        args.extend(steps.iter().map(|s| s.to_string()));
        args.push("--reference".into());
        let out = cli(&args, None);
        assert!(out.status.success(), "{}", stderr(&out));
        let want: ArrayD<f64> = read_npy(dir.path("O.npy")).unwrap();
        let rtol = 5e-5 + 1.0 / 2048.0;
        let mut worst = 0.0f64;
        for ((g, r), w) in outs[0].iter().zip(&ran).zip(want.iter()) {
            let err = (*g as f64 - w).abs();
            worst = worst.max(err);
            assert!(err <= 5e-5 + rtol * w.abs(), "{method:?}: {g} vs {w}");
            let (g, r) = (*g as f64, *r as f64);
            assert!(
                (g - r).abs() <= 1e-4 + (1e-4 + 1.0 / 1024.0) * r.abs(),
                "{method:?}: decode {g} vs run {r}"
            );
        }
        eprintln!("decode --storage f16 {method:?}: max |O - ref| {worst:.3e}");
    }
}

#[test]
fn grad_with_f16_storage_writes_float16_gradients_near_the_reference() {
    use std::io::Read;
    let dir = Scratch::new("storage-grad");
    let shape = [1, 2, 50, 8];
    let len: usize = shape.iter().product();
    for (i, name) in ["Q", "K", "V", "dO"].iter().enumerate() {
        let r = round_to_f16(&normal_tensor(800 + i as u64, len));
        write_f16(&dir.path(&format!("{name}16.npy")), &shape, &r);
        write_f32(&dir.path(&format!("{name}r.npy")), &shape, &r);
    }
    let args = |suffix: &str, out: &str, extra: &[&str]| {
        let mut a = vec!["grad".to_string()];
        for (flag, n) in [("--q", "Q"), ("--k", "K"), ("--v", "V"), ("--dout", "dO")] {
            a.push(flag.into());
            a.push(dir.arg(&format!("{n}{suffix}.npy")));
        }
        a.extend(["--out".into(), dir.arg(out), "--block".into(), "8".into()]);
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let out = cli(
        &args("16", "g16.npz", &["--storage", "f16", "--causal"]),
        None,
    );
    if no_adapter(&out) || (out.status.code() == Some(1) && stderr(&out).contains("SHADER_F16")) {
        eprintln!("no adapter with SHADER_F16: skipping");
        return;
    }
    assert!(out.status.success(), "{}", stderr(&out));
    let out = cli(&args("r", "gref.npz", &["--reference", "--causal"]), None);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut zip = zip::ZipArchive::new(std::fs::File::open(dir.path("g16.npz")).unwrap()).unwrap();
    let mut reference =
        ndarray_npy::NpzReader::new(std::fs::File::open(dir.path("gref.npz")).unwrap()).unwrap();
    // The tolerance of tests/gpu/f16.rs's gradients, relative to each tensor's scale.
    let tol = 2e-4 + 8.0 / 2048.0;
    for name in ["dq", "dk", "dv"] {
        let mut bytes = Vec::new();
        zip.by_name(&format!("{name}.npy"))
            .unwrap()
            .read_to_end(&mut bytes)
            .unwrap();
        let (got_shape, got) = parse_f16(&bytes);
        assert_eq!(got_shape, shape, "{name}");
        let want: ArrayD<f64> = reference.by_name(name).unwrap();
        let scale = want.iter().fold(1.0f64, |m, x| m.max(x.abs()));
        for (g, w) in got.iter().zip(want.iter()) {
            assert!((*g as f64 - w).abs() <= tol * scale, "{name}: {g} vs {w}");
        }
    }
    // Learned weights: their gradients (f32 sums) come back with f16 storage too, and the file
    // is float32 throughout (dq holding f16 values), near the reference's at the same tolerance.
    let out = cli(
        &args(
            "16",
            "gl.npz",
            &["--storage", "f16", "--downsample", "learned"],
        ),
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = cli(
        &args(
            "r",
            "glref.npz",
            &["--reference", "--downsample", "learned"],
        ),
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let mut got =
        ndarray_npy::NpzReader::new(std::fs::File::open(dir.path("gl.npz")).unwrap()).unwrap();
    let mut want =
        ndarray_npy::NpzReader::new(std::fs::File::open(dir.path("glref.npz")).unwrap()).unwrap();
    for name in ["dq", "k_w1", "v_b1"] {
        let g: ArrayD<f32> = got.by_name(name).unwrap();
        let w: ArrayD<f64> = want.by_name(name).unwrap();
        assert_eq!(g.shape(), w.shape(), "{name}");
        if name == "dq" {
            let v: Vec<f32> = g.iter().copied().collect();
            assert_eq!(v, round_to_f16(&v), "dq holds f16 values");
        }
        let scale = w.iter().fold(1.0f64, |m, x| m.max(x.abs()));
        for (g, w) in g.iter().zip(w.iter()) {
            assert!((*g as f64 - w).abs() <= tol * scale, "{name}: {g} vs {w}");
        }
    }
}
