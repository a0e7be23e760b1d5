//! `multipole-attn doctor`: the conformance suite on every adapter, one table per adapter, or
//! with `--json` the report document the browser page's "Test this GPU" also produces.

use std::time::Instant;

use crate::args::DoctorArgs;
use crate::error::{CliError, CliResult};
use indicatif::{ProgressBar, ProgressStyle};
use multipole_attn::conformance::report::{AdapterReport, Report};
use multipole_attn::conformance::{suite, ATOL, COOP_TOL, RTOL};
use multipole_attn::gpu::{adapter_support, all_adapters, ContextOptions, CoopMode, GpuContext};

/// Runs the suite on each adapter (optionally only some backends) and prints a table per
/// adapter, or the JSON report; fails if any adapter fails any case or no adapter is found.
pub fn doctor(a: &DoctorArgs) -> CliResult<()> {
    let backend_of = |ad: &wgpu::Adapter| format!("{:?}", ad.get_info().backend).to_lowercase();
    let wanted: Vec<String> = a.backends.iter().map(|b| b.trim().to_lowercase()).collect();
    let adapters: Vec<_> = all_adapters()
        .into_iter()
        .filter(|ad| wanted.is_empty() || wanted.contains(&backend_of(ad)))
        .collect();
    if adapters.is_empty() {
        return Err(CliError::NoAdapter);
    }
    // A required backend needs an adapter that can run the suite: one without compute
    // shaders there (NVIDIA's GL 3.3 context) is no substitute.
    let found: Vec<String> = adapters
        .iter()
        .filter(|ad| adapter_support(ad).is_ok())
        .map(backend_of)
        .collect();
    for backend in &a.require {
        let backend = backend.trim().to_lowercase();
        if !found.contains(&backend) {
            return Err(CliError::Runtime(format!(
                "no adapter that can run compute passes on the required backend '{backend}' \
                 (found: {})",
                found.join(", ")
            )));
        }
    }
    let say = |line: String| {
        if !a.json {
            outln!("{line}");
        }
    };
    let cases = suite().len();
    say(format!("conformance suite: {cases} cases per adapter, bound |gpu - f64 reference| <= {ATOL:e} + {RTOL:e} |ref|\n"));
    if a.cooperative_matrix {
        say(format!(
            "dense cases on cooperative matrices where the adapter offers them (f16 inputs): bound {COOP_TOL:e} + {COOP_TOL:e} |ref|\n"
        ));
    }
    let mut reports = Vec::new();
    for adapter in adapters {
        let info = adapter.get_info();
        say(format!(
            "== {} ({:?}, {:?}), driver: {} {}",
            info.name, info.backend, info.device_type, info.driver, info.driver_info
        ));
        if let Err(why) = adapter_support(&adapter) {
            say(format!(
                "   not tested: the adapter cannot run compute passes ({why})\n"
            ));
            reports.push(AdapterReport::unsupported(&info, why));
            continue;
        }
        let start = Instant::now();
        let options = ContextOptions {
            cooperative_matrix: if a.cooperative_matrix {
                CoopMode::IfOffered
            } else {
                CoopMode::Off
            },
            ..Default::default()
        };
        let ctx = match pollster::block_on(GpuContext::from_adapter(&adapter, options)) {
            Ok(ctx) => ctx,
            Err(e) => {
                say(format!("   could not create a device: {e}\n"));
                let secs = start.elapsed().as_secs_f64();
                reports.push(AdapterReport::no_device(&info, e.to_string(), secs));
                continue;
            }
        };
        let bar = progress_bar(cases, &info.name);
        let clock = move || start.elapsed().as_secs_f64();
        let report = pollster::block_on(AdapterReport::run(&ctx, &clock, |_, _, r| {
            bar.inc(1);
            bar.set_message(r.name.clone());
            if !a.json && (a.verbose || !r.passed) {
                let status = if r.passed { "ok  " } else { "FAIL" };
                let err = r
                    .error
                    .as_deref()
                    .map(|e| format!("  ({e})"))
                    .unwrap_or_default();
                // Above the bar, which redraws below it; suspend rather than bar.println, which
                // prints nothing when the bar is hidden (stderr not a terminal).
                bar.suspend(|| {
                    outln!(
                        "   {status} {:<48} max err {:9.2e} {:7.2}s{err}",
                        r.name,
                        r.max_err,
                        r.seconds
                    )
                });
            }
        }));
        bar.finish_and_clear();
        say(format!("   kernels: {}", report.kernels));
        say(format!(
            "   {} passed, {} failed, worst error {:.2e}, {:.1}s\n",
            report.passed, report.failed, report.worst_error, report.seconds
        ));
        reports.push(report);
    }
    let report = Report::new(reports);
    if a.json {
        outln!("{}", report.to_json());
    } else {
        print_table(&report);
    }
    if report.passed() {
        Ok(())
    } else {
        Err(CliError::Runtime(
            "at least one adapter failed the conformance suite".into(),
        ))
    }
}

/// A bar on stderr for one adapter's cases; indicatif draws it only when stderr is a
/// terminal, so logs and CI output stay clean.
fn progress_bar(cases: usize, adapter: &str) -> ProgressBar {
    let bar = ProgressBar::new(cases as u64);
    if let Ok(style) =
        ProgressStyle::with_template("   {prefix} [{bar:30}] {pos}/{len} {elapsed} {wide_msg}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(adapter.chars().take(24).collect::<String>());
    bar
}

/// The summary table: one row per adapter.
fn print_table(report: &Report) {
    outln!(
        "{:<36} {:<8} {:<40} {:<11} {:>6} {:>6} {:>10} {:>8}",
        "adapter",
        "backend",
        "driver",
        "kernels",
        "passed",
        "failed",
        "worst err",
        "time"
    );
    for r in &report.adapters {
        let driver: String = r.driver.chars().take(40).collect();
        if let Some(why) = &r.unsupported {
            outln!(
                "{:<36} {:<8} {:<40} not tested: cannot run compute passes ({why})",
                r.adapter,
                r.backend,
                driver
            );
            continue;
        }
        outln!(
            "{:<36} {:<8} {:<40} {:<11} {:>6} {:>6} {:>10.2e} {:>7.1}s",
            r.adapter,
            r.backend,
            driver,
            r.kernels,
            r.passed,
            r.failed,
            r.worst_error,
            r.seconds
        );
    }
}
