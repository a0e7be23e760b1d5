//! GPU test helpers: one shared context per test binary, and the closeness check.
#![allow(dead_code)]

use std::sync::OnceLock;

use multipole_attn::gpu::{ContextOptions, GpuContext};

/// The shared context, or `None` (test skipped) when no adapter exists locally. Under CI
/// (`CI=true`) a missing adapter is a failure, so GPU tests can never pass by not running.
pub fn gpu() -> Option<&'static GpuContext> {
    static CTX: OnceLock<Option<GpuContext>> = OnceLock::new();
    CTX.get_or_init(|| open(ContextOptions::default())).as_ref()
}

/// A context that asks only for what a browser grants (256 invocations, 16 KiB workgroup memory).
pub fn browser_like_gpu() -> Option<&'static GpuContext> {
    static CTX: OnceLock<Option<GpuContext>> = OnceLock::new();
    CTX.get_or_init(|| open(ContextOptions { browser_limits: true })).as_ref()
}

fn open(options: ContextOptions) -> Option<GpuContext> {
    let _ = env_logger::builder().is_test(true).try_init();
    match GpuContext::with_options(options) {
        Ok(ctx) => {
            eprintln!("adapter: {} ({:?})", ctx.info.name, ctx.info.backend);
            Some(ctx)
        }
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") => {
            panic!("CI=true but no GPU adapter: {e}")
        }
        Err(e) => {
            eprintln!("skipping GPU test: {e}");
            None
        }
    }
}

/// Result of comparing a GPU tensor with the f64 reference: |gpu - ref| <= atol + rtol |ref|.
#[derive(Debug)]
pub struct Closeness {
    pub violations: usize,
    pub max_abs: f64,
    pub worst_index: usize,
}

pub fn closeness(gpu: &[f32], reference: &[f64], atol: f64, rtol: f64) -> Closeness {
    assert_eq!(gpu.len(), reference.len(), "length differs");
    let mut c = Closeness { violations: 0, max_abs: 0.0, worst_index: 0 };
    for (i, (&g, &r)) in gpu.iter().zip(reference).enumerate() {
        let err = (g as f64 - r).abs();
        // NaN (an unwritten poisoned element) fails: !(NaN <= x).
        if !(err <= atol + rtol * r.abs()) {
            c.violations += 1;
        }
        if err > c.max_abs || err.is_nan() {
            c.max_abs = if err.is_nan() { f64::INFINITY } else { err };
            c.worst_index = i;
        }
    }
    c
}
