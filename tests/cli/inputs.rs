//! Inputs users have (issue 19): float16 .npy files (read as the float32 of the same values,
//! so the result is that of a float32 file holding them, to the bit), the clear error for
//! dtypes that are not floats, and a block size far beyond n, which must cost what m = n costs.

use ndarray::{ArrayD, IxDyn};
use ndarray_npy::{read_npy, write_npy};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::scratch::Scratch;
use multipole_attn::random::normal_tensor;

/// `run` on `{prefix}Q.npy`, `{prefix}K.npy`, `{prefix}V.npy` of `dir`, O into `out`.
fn run(dir: &Scratch, prefix: &str, out: &str, extra: &[&str]) -> Output {
    run_within(dir, prefix, out, extra, Duration::from_secs(600))
}

/// [`run`], killing the process and failing loudly after `deadline`.
fn run_within(
    dir: &Scratch,
    prefix: &str,
    out: &str,
    extra: &[&str],
    deadline: Duration,
) -> Output {
    let file = |t: &str| dir.path(&format!("{prefix}{t}.npy"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_multipole-attn"))
        .arg("run")
        .arg("--q")
        .arg(file("Q"))
        .arg("--k")
        .arg(file("K"))
        .arg("--v")
        .arg(file("V"))
        .arg("--out")
        .arg(dir.path(out))
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run multipole-attn");
    let start = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > deadline {
            let _ = child.kill();
            panic!("multipole-attn {extra:?} not finished after {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("collect output")
}

/// Whether `out` failed only for want of a GPU adapter (the test then skips, unless CI).
fn no_adapter(out: &Output) -> bool {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    let stderr = String::from_utf8_lossy(&out.stderr);
    !ci && out.status.code() == Some(1) && stderr.contains("no GPU adapter found")
}

fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A float16 .npy file of `values` (as numpy writes it: version 1.0, header padded to 64).
fn write_f16(path: &Path, shape: &[usize], values: &[half::f16], big_endian: bool) {
    let dims: Vec<String> = shape.iter().map(|s| format!("{s}, ")).collect();
    let descr = if big_endian { ">f2" } else { "<f2" };
    let mut header = format!(
        "{{'descr': '{descr}', 'fortran_order': False, 'shape': ({}), }}",
        dims.concat()
    );
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((header.len() as u16).to_le_bytes());
    bytes.extend(header.as_bytes());
    for v in values {
        bytes.extend(if big_endian {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        });
    }
    std::fs::write(path, bytes).expect("write f16 npy");
}

#[test]
fn float16_input_gives_the_float32_result_of_the_same_values() {
    let dir = Scratch::new("f16");
    let shape = [2, 3, 50, 8];
    let len: usize = shape.iter().product();
    for (i, t) in ["Q", "K", "V"].iter().enumerate() {
        let h: Vec<half::f16> = normal_tensor(190 + i as u64, len)
            .into_iter()
            .map(half::f16::from_f32)
            .collect();
        write_f16(&dir.path(&format!("h{t}.npy")), &shape, &h, false);
        write_f16(&dir.path(&format!("b{t}.npy")), &shape, &h, true);
        // The same values in float32: f16 -> f32 is exact.
        let f: Vec<f32> = h.iter().map(|x| x.to_f32()).collect();
        let arr = ArrayD::from_shape_vec(IxDyn(&shape), f).unwrap();
        write_npy(dir.path(&format!("f{t}.npy")), &arr).unwrap();
    }
    let opts = ["--block", "16", "--rank", "2"];
    for extra in [vec!["--reference"], vec![]] {
        let mut args = opts.to_vec();
        args.extend(&extra);
        let want = run(&dir, "f", "want.npy", &args);
        if no_adapter(&want) {
            eprintln!("no GPU adapter: skipping the GPU run");
            continue;
        }
        assert_ok(&want);
        for prefix in ["h", "b"] {
            assert_ok(&run(&dir, prefix, "got.npy", &args));
            // The reference writes float64, the GPU float32: compare as f64 bits.
            let read = |name: &str| -> Vec<u64> {
                let path = dir.path(name);
                match read_npy::<_, ArrayD<f64>>(&path) {
                    Ok(a) => a.iter().map(|x| x.to_bits()).collect(),
                    Err(_) => read_npy::<_, ArrayD<f32>>(&path)
                        .unwrap()
                        .iter()
                        .map(|&x| f64::from(x).to_bits())
                        .collect(),
                }
            };
            assert_eq!(read("got.npy"), read("want.npy"), "{prefix} {extra:?}");
        }
    }
}

#[test]
fn complex_input_is_still_a_clear_error() {
    let dir = Scratch::new("complex");
    let h = vec![half::f16::ONE; 16];
    for t in ["Q", "K", "V"] {
        write_f16(&dir.path(&format!("{t}.npy")), &[8, 2], &h, false);
    }
    // Overwrite Q's descriptor with complex64 of the same size class ('<c8' needs 8 bytes per
    // value: 16 values of 2 bytes are 4 of them, so a valid-looking (4,) shape).
    let mut bytes = std::fs::read(dir.path("Q.npy")).unwrap();
    for (from, to) in [(&b"'<f2'"[..], &b"'<c8'"[..]), (b"(8, 2, )", b"(4,    )")] {
        let at = bytes.windows(from.len()).position(|w| w == from).unwrap();
        bytes[at..at + from.len()].copy_from_slice(to);
    }
    std::fs::write(dir.path("Q.npy"), bytes).unwrap();
    let out = run(&dir, "", "O.npy", &["--reference"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    for needle in ["complex64", "float16, float32 and float64", "bfloat16"] {
        assert!(stderr.contains(needle), "expected {needle:?} in {stderr}");
    }
}

#[test]
fn a_block_size_of_2_pow_31_minus_1_runs_as_fast_as_m_equals_n() {
    let dir = Scratch::new("huge-m");
    let shape = [64, 16];
    for (i, t) in ["Q", "K", "V"].iter().enumerate() {
        let arr = ArrayD::from_shape_vec(IxDyn(&shape), normal_tensor(90 + i as u64, 1024));
        write_npy(dir.path(&format!("{t}.npy")), &arr.unwrap()).unwrap();
    }
    // Before issue 19, m = 10^9 on these 64 tokens ran for minutes (work grew with m).
    let deadline = Duration::from_secs(60);
    for device in [&["--reference"][..], &[]] {
        let mut args = device.to_vec();
        args.extend(["--block", "64", "--rank", "1"]);
        let want = run(&dir, "", "want.npy", &args);
        if no_adapter(&want) {
            continue;
        }
        assert_ok(&want);
        let mut args = device.to_vec();
        args.extend(["--block", "2147483647", "--rank", "1"]);
        assert_ok(&run_within(&dir, "", "got.npy", &args, deadline));
        let a = std::fs::read(dir.path("got.npy")).unwrap();
        let b = std::fs::read(dir.path("want.npy")).unwrap();
        assert!(a == b, "m = 2^31 - 1 differs from m = n {device:?}");
    }
}
