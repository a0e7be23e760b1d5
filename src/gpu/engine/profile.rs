//! The opt-in per-pass profiler (issue 29: why do some sizes take 7x longer than their half?):
//! while installed on a context ([`crate::gpu::GpuContext::start_profiling`]), the record loop
//! writes a GPU timestamp before and after every dispatch it records, labelled with the
//! dispatch's pass name and level; [`crate::gpu::GpuContext::take_profile`] reads them back.
//! Off (the default) it costs one relaxed atomic load per dispatch recorded, nothing on the
//! GPU.
//!
//! Timestamps are written inside compute passes (the library records a whole forward in one
//! pass, so pass-boundary timestamps would time only the whole): the device needs
//! `TIMESTAMP_QUERY | TIMESTAMP_QUERY_INSIDE_PASSES` (lavapipe and NVIDIA's Vulkan have
//! both; Apple's Metal does not). A dispatch's time is end minus begin of its own pair, so it
//! includes any barrier wgpu inserts before it but not the gaps between dispatches.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::error::{FmaError, Result};
use crate::gpu::engine::pipelines::poisoned;

/// The features the profiler needs on a device.
pub fn features() -> wgpu::Features {
    wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES
}

/// The GPU time of one recorded dispatch.
#[derive(Clone, Debug, PartialEq)]
pub struct PassTime {
    /// The pass's name (`plan::Pass::name`, e.g. `fine_attention`), or the label of a pass
    /// recorded outside the plan machinery (`dense_coop`).
    pub pass: &'static str,
    /// Its coarse level (l - 1) for the per-level passes, else `None`.
    pub level: Option<u32>,
    /// Nanoseconds from the timestamp before the dispatch to the one after it (0 where the
    /// GPU's clock went backwards between them).
    pub ns: f64,
}

/// An installed profiler: a query set with two timestamps per dispatch and their labels.
struct Installed {
    queries: wgpu::QuerySet,
    capacity: u32,
    labels: Vec<(&'static str, Option<u32>)>,
    /// Dispatches recorded beyond the capacity (not timed).
    dropped: u32,
}

/// A context's profiler slot, shared by its clones (the executors hold clones).
#[derive(Default)]
pub(crate) struct Profiler {
    on: AtomicBool,
    installed: Mutex<Option<Installed>>,
}

/// The query of a dispatch being timed (its begin timestamp's index).
pub(crate) struct Timed(u32);

impl Profiler {
    /// Installs a fresh query set for `dispatches` dispatches (replacing any earlier one).
    pub fn start(&self, device: &wgpu::Device, dispatches: u32) -> Result<()> {
        if !device.features().contains(features()) {
            return Err(FmaError::InvalidConfig {
                what: "profiling",
                value: "on".into(),
                allowed: "only on a device with Features::TIMESTAMP_QUERY and \
                          TIMESTAMP_QUERY_INSIDE_PASSES (this one lacks them)"
                    .into(),
            });
        }
        // wgpu caps a query set at 4096 queries.
        let max = wgpu::QUERY_SET_MAX_QUERIES / 2;
        if dispatches == 0 || dispatches > max {
            return Err(FmaError::InvalidConfig {
                what: "profiled dispatches",
                value: dispatches.to_string(),
                allowed: format!("1 ..= {max}"),
            });
        }
        let queries = device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("per-pass profiler"),
            ty: wgpu::QueryType::Timestamp,
            count: 2 * dispatches,
        });
        *self.installed.lock().map_err(poisoned)? = Some(Installed {
            queries,
            capacity: dispatches,
            labels: Vec::new(),
            dropped: 0,
        });
        self.on.store(true, Ordering::Release);
        Ok(())
    }

    /// Writes the begin timestamp of a dispatch of `pass` (level `level`) into `cpass`, when a
    /// profiler is installed and has room.
    pub fn begin(
        &self,
        cpass: &mut wgpu::ComputePass<'_>,
        pass: &'static str,
        level: Option<u32>,
    ) -> Option<Timed> {
        if !self.on.load(Ordering::Relaxed) {
            return None;
        }
        let mut guard = self.installed.lock().ok()?;
        let p = guard.as_mut()?;
        let k = p.labels.len() as u32;
        if k >= p.capacity {
            p.dropped += 1;
            return None;
        }
        p.labels.push((pass, level));
        cpass.write_timestamp(&p.queries, 2 * k);
        Some(Timed(2 * k))
    }

    /// Writes the end timestamp of a dispatch `begin` started.
    pub fn end(&self, cpass: &mut wgpu::ComputePass<'_>, timed: Option<Timed>) {
        let Some(Timed(q)) = timed else { return };
        if let Ok(guard) = self.installed.lock() {
            if let Some(p) = guard.as_ref() {
                cpass.write_timestamp(&p.queries, q + 1);
            }
        }
    }

    /// Uninstalls the profiler and reads its timestamps back (after the work recorded with
    /// it has been submitted): one [`PassTime`] per timed dispatch in recording order, and the
    /// count of dispatches recorded past its capacity.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn take(&self, device: &wgpu::Device, queue: &wgpu::Queue) -> Result<(Vec<PassTime>, u32)> {
        self.on.store(false, Ordering::Release);
        let Some(p) = self.installed.lock().map_err(poisoned)?.take() else {
            return Err(FmaError::InvalidConfig {
                what: "take_profile",
                value: "no profiler".into(),
                allowed: "after GpuContext::start_profiling".into(),
            });
        };
        let count = 2 * p.labels.len() as u32;
        if count == 0 {
            return Ok((Vec::new(), p.dropped));
        }
        let bytes = count as u64 * wgpu::QUERY_SIZE as u64;
        let resolve = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("profiler resolve"),
            size: bytes,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let staging = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("profiler readback"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("profiler readback"),
        });
        enc.resolve_query_set(&p.queries, 0..count, &resolve, 0);
        enc.copy_buffer_to_buffer(&resolve, 0, &staging, 0, bytes);
        queue.submit([enc.finish()]);
        let words = pollster::block_on(crate::gpu::engine::buffers::read_f32(
            device, &staging, bytes,
        ))?;
        let ticks: Vec<u64> = words
            .chunks(2)
            .map(|w| w[0].to_bits() as u64 | (w[1].to_bits() as u64) << 32)
            .collect();
        let period = queue.get_timestamp_period() as f64;
        let times = p
            .labels
            .iter()
            .enumerate()
            .map(|(k, &(pass, level))| PassTime {
                pass,
                level,
                ns: ticks[2 * k + 1].saturating_sub(ticks[2 * k]) as f64 * period,
            })
            .collect();
        Ok((times, p.dropped))
    }
}

/// `times` summed by (pass, level), in order of first appearance: (pass, level, dispatches,
/// total nanoseconds).
pub fn summarize(times: &[PassTime]) -> Vec<(&'static str, Option<u32>, usize, f64)> {
    let mut out: Vec<(&'static str, Option<u32>, usize, f64)> = Vec::new();
    for t in times {
        match out
            .iter_mut()
            .find(|(p, l, _, _)| *p == t.pass && *l == t.level)
        {
            Some(row) => {
                row.2 += 1;
                row.3 += t.ns;
            }
            None => out.push((t.pass, t.level, 1, t.ns)),
        }
    }
    out
}

/// `times` as a table summed by pass and level ([`summarize`]): one line per (pass, level)
/// with its dispatches, milliseconds and share of the total, then the total (and the count of
/// untimed dispatches, `dropped`, when any): what `examples/bench --per-pass` prints.
pub fn format_table(times: &[PassTime], dropped: u32) -> String {
    use std::fmt::Write;
    let rows = summarize(times);
    let total: f64 = rows.iter().map(|r| r.3).sum();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "  {:<28} {:>5} {:>10} {:>10} {:>6}",
        "pass", "level", "dispatches", "ms", "share"
    );
    for (pass, level, count, ns) in &rows {
        let level = level.map_or("-".to_string(), |l| l.to_string());
        let share = if total > 0.0 { 100.0 * ns / total } else { 0.0 };
        let _ = writeln!(
            s,
            "  {pass:<28} {level:>5} {count:>10} {:>10.3} {share:>5.1}%",
            ns * 1e-6
        );
    }
    let _ = writeln!(
        s,
        "  {:<28} {:>5} {:>10} {:>10.3}",
        "total",
        "",
        times.len(),
        total * 1e-6
    );
    if dropped > 0 {
        let _ = writeln!(
            s,
            "  ({dropped} more dispatches not timed: the profiler was full)"
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_sums_by_pass_and_level() {
        let t = |pass, level, ns| PassTime { pass, level, ns };
        let text = format_table(
            &[
                t("downsample", Some(0), 1e6),
                t("fine_attention", None, 3e6),
                t("downsample", Some(0), 1e6),
            ],
            2,
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        let cols = |l: &str| l.split_whitespace().map(str::to_string).collect::<Vec<_>>();
        assert_eq!(cols(lines[1]), ["downsample", "0", "2", "2.000", "40.0%"]);
        assert_eq!(
            cols(lines[2]),
            ["fine_attention", "-", "1", "3.000", "60.0%"]
        );
        assert_eq!(cols(lines[3]), ["total", "3", "5.000"]);
        assert!(lines[4].contains("2 more dispatches not timed"), "{text}");
        assert_eq!(format_table(&[], 0).lines().count(), 2);
    }

    #[test]
    fn summaries_add_by_pass_and_level_in_first_order() {
        let t = |pass, level, ns| PassTime { pass, level, ns };
        let times = [
            t("downsample", Some(0), 1.0),
            t("fine_attention", None, 5.0),
            t("downsample", Some(1), 2.0),
            t("downsample", Some(0), 3.0),
        ];
        assert_eq!(
            summarize(&times),
            vec![
                ("downsample", Some(0), 2, 4.0),
                ("fine_attention", None, 1, 5.0),
                ("downsample", Some(1), 1, 2.0),
            ]
        );
        assert!(summarize(&[]).is_empty());
    }
}
