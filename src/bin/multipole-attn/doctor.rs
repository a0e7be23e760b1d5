//! `multipole-attn doctor`: the conformance suite on every adapter, one table per adapter.

use std::time::Instant;

use crate::args::DoctorArgs;
use crate::error::{CliError, CliResult};
use multipole_attn::conformance::{run_suite, suite, ATOL, RTOL};
use multipole_attn::gpu::{all_adapters, ContextOptions, GpuContext};

/// Runs the suite on each adapter (optionally only some backends) and prints a table per
/// adapter; fails if any adapter fails any case or no adapter is found.
pub fn doctor(a: &DoctorArgs) -> CliResult<()> {
    let wanted: Vec<String> = a
        .backends
        .iter()
        .map(|b| b.trim().to_ascii_lowercase())
        .collect();
    let adapters: Vec<_> = all_adapters()
        .into_iter()
        .filter(|ad| {
            wanted.is_empty()
                || wanted.contains(&format!("{:?}", ad.get_info().backend).to_ascii_lowercase())
        })
        .collect();
    if adapters.is_empty() {
        return Err(CliError::NoAdapter);
    }
    let found: Vec<String> = adapters
        .iter()
        .map(|ad| format!("{:?}", ad.get_info().backend).to_ascii_lowercase())
        .collect();
    for backend in &a.require {
        let backend = backend.trim().to_ascii_lowercase();
        if !found.contains(&backend) {
            return Err(CliError::Runtime(format!(
                "no adapter on the required backend '{backend}' (found: {})",
                found.join(", ")
            )));
        }
    }
    let cases = suite().len();
    println!("conformance suite: {cases} cases per adapter, bound |gpu - f64 reference| <= {ATOL:e} + {RTOL:e} |ref|\n");
    let mut summary = Vec::new();
    let mut all_ok = true;
    for adapter in adapters {
        let info = adapter.get_info();
        println!(
            "== {} ({:?}, {:?}), driver: {} {}",
            info.name, info.backend, info.device_type, info.driver, info.driver_info
        );
        let start = Instant::now();
        let mut kernels = String::from("-");
        let results = match pollster::block_on(GpuContext::from_adapter(
            &adapter,
            ContextOptions::default(),
        )) {
            Ok(ctx) => {
                // Which attention kernels this device runs: the suite checks that variant.
                kernels = match ctx.subgroup_kernels() {
                    Some(sg) => format!("subgroup {sg}"),
                    None => "plain".into(),
                };
                println!("   kernels: {kernels}");
                pollster::block_on(run_suite(&ctx, |r| {
                    if a.verbose || !r.passed {
                        let status = if r.passed { "ok  " } else { "FAIL" };
                        let err = r
                            .error
                            .as_deref()
                            .map(|e| format!("  ({e})"))
                            .unwrap_or_default();
                        println!(
                            "   {status} {:<48} max err {:9.2e} {:7.2}s{err}",
                            r.name, r.max_err, r.seconds
                        );
                    }
                }))
            }
            Err(e) => {
                println!("   could not create a device: {e}\n");
                all_ok = false;
                summary.push((
                    info,
                    kernels,
                    0,
                    cases,
                    f64::INFINITY,
                    start.elapsed().as_secs_f64(),
                ));
                continue;
            }
        };
        let failed = results.iter().filter(|r| !r.passed).count();
        let worst = results.iter().map(|r| r.max_err).fold(0.0, f64::max);
        println!(
            "   {} passed, {failed} failed, worst error {worst:.2e}, {:.1}s\n",
            results.len() - failed,
            start.elapsed().as_secs_f64()
        );
        all_ok &= failed == 0;
        summary.push((
            info,
            kernels,
            results.len() - failed,
            failed,
            worst,
            start.elapsed().as_secs_f64(),
        ));
    }
    println!(
        "{:<36} {:<8} {:<40} {:<11} {:>6} {:>6} {:>10} {:>8}",
        "adapter", "backend", "driver", "kernels", "passed", "failed", "worst err", "time"
    );
    for (info, kernels, passed, failed, worst, secs) in &summary {
        let driver: String = format!("{} {}", info.driver, info.driver_info)
            .chars()
            .take(40)
            .collect();
        println!(
            "{:<36} {:<8} {:<40} {:<11} {:>6} {:>6} {:>10.2e} {:>7.1}s",
            info.name,
            format!("{:?}", info.backend),
            driver,
            kernels,
            passed,
            failed,
            worst,
            secs
        );
    }
    if all_ok {
        Ok(())
    } else {
        Err(CliError::Runtime(
            "at least one adapter failed the conformance suite".into(),
        ))
    }
}
