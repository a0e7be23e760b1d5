//! `multipole-attn info`: every adapter wgpu finds, with the limits and features the library
//! depends on (storage binding size bounds one tensor, workgroup storage bounds the tiles).

use crate::error::{CliError, CliResult};
use multipole_attn::gpu::{describe_shapes, list_adapters, AdapterSummary};
use std::fmt::Write;

/// Runs the `info` subcommand: prints one block per adapter, or fails when there is none.
pub fn info() -> CliResult<()> {
    let reports = list_adapters();
    if reports.is_empty() {
        return Err(CliError::NoAdapter);
    }
    let blocks: Vec<String> = reports
        .iter()
        .enumerate()
        .map(|(i, r)| format_report(i, r))
        .collect();
    out!("{}", blocks.join("\n"));
    Ok(())
}

/// A byte count with its binary-unit rendering, e.g. `134217728 (128.0 MiB)`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = "B";
    for u in UNITS {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = u;
    }
    if unit == "B" {
        format!("{n} B")
    } else {
        format!("{n} ({value:.1} {unit})")
    }
}

/// One adapter as a block of text: identity, driver, the limits and features that matter here.
pub fn format_report(index: usize, r: &AdapterSummary) -> String {
    let (info, l) = (&r.info, &r.limits);
    let mut s = String::new();
    // Writing to a String cannot fail; the results are ignored on purpose.
    let _ = writeln!(s, "adapter {index}: {}", info.name);
    let _ = writeln!(s, "  backend:      {:?}", info.backend);
    let _ = writeln!(s, "  device type:  {:?}", info.device_type);
    let _ = writeln!(
        s,
        "  vendor/device: {:#06x} / {:#06x}",
        info.vendor, info.device
    );
    let driver = match (info.driver.is_empty(), info.driver_info.is_empty()) {
        (true, true) => "(not reported)".to_string(),
        (false, true) => info.driver.clone(),
        (true, false) => info.driver_info.clone(),
        (false, false) => format!("{} ({})", info.driver, info.driver_info),
    };
    let _ = writeln!(s, "  driver:       {driver}");
    if let Some(why) = &r.unsupported {
        // One clear line; the library never picks this adapter by default.
        let _ = writeln!(s, "  unusable:     cannot run compute passes ({why})");
    }
    let _ = writeln!(s, "  limits:");
    let limits = [
        (
            "max_storage_buffer_binding_size",
            bytes(l.max_storage_buffer_binding_size),
        ),
        ("max_buffer_size", bytes(l.max_buffer_size)),
        (
            "max_compute_workgroup_storage_size",
            bytes(l.max_compute_workgroup_storage_size.into()),
        ),
        (
            "max_compute_invocations_per_workgroup",
            l.max_compute_invocations_per_workgroup.to_string(),
        ),
        (
            "max_compute_workgroups_per_dimension",
            l.max_compute_workgroups_per_dimension.to_string(),
        ),
        (
            "max_compute_workgroup_size_x",
            l.max_compute_workgroup_size_x.to_string(),
        ),
    ];
    for (name, value) in limits {
        let _ = writeln!(s, "    {name:<38} {value}");
    }
    let _ = writeln!(s, "  features:");
    for (name, flag) in [
        ("SHADER_F16", wgpu::Features::SHADER_F16),
        ("SUBGROUP", wgpu::Features::SUBGROUP),
        ("TIMESTAMP_QUERY", wgpu::Features::TIMESTAMP_QUERY),
    ] {
        let yes = if r.features.contains(flag) {
            "yes"
        } else {
            "no"
        };
        let _ = writeln!(s, "    {name:<38} {yes}");
    }
    // Tensor cores (issue 29): the shapes, and whether dense attention would run on them with
    // `ContextOptions::cooperative_matrix` (or what the adapter lacks).
    let _ = writeln!(
        s,
        "  cooperative matrices: {}",
        describe_shapes(&r.cooperative_matrix)
    );
    let used = match r.coop_offer().choose() {
        Ok(shape) => format!(
            "yes, {0}x{0}x{0} f16->f32 with subgroups of {1} (opt-in)",
            shape.size, shape.subgroup
        ),
        Err(why) => format!("no ({why})"),
    };
    let _ = writeln!(s, "    {:<38} {used}", "dense kernel on them");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_renders_binary_units() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(134_217_728), "134217728 (128.0 MiB)");
    }

    #[test]
    fn report_lists_limits_and_features() {
        let mut info = wgpu::AdapterInfo::new(wgpu::DeviceType::DiscreteGpu, wgpu::Backend::Vulkan);
        info.name = "Test GPU".into();
        info.vendor = 0x10de;
        info.device = 0x2330;
        info.driver = "drv".into();
        info.driver_info = "1.2.3".into();
        let report = AdapterSummary {
            info,
            limits: wgpu::Limits::default(),
            features: wgpu::Features::SUBGROUP,
            unsupported: None,
            cooperative_matrix: Vec::new(),
        };
        let text = format_report(0, &report);
        assert!(text.starts_with("adapter 0: Test GPU\n"), "{text}");
        assert!(
            text.contains("Vulkan") && text.contains("DiscreteGpu"),
            "{text}"
        );
        assert!(text.contains("drv (1.2.3)"), "{text}");
        assert!(text.contains("max_storage_buffer_binding_size"), "{text}");
        assert!(text.contains("max_compute_workgroup_size_x"), "{text}");
        let feature = |name: &str| {
            text.lines()
                .find(|l| l.trim_start().starts_with(name))
                .map(|l| l.split_whitespace().last() == Some("yes"))
        };
        assert_eq!(feature("SUBGROUP"), Some(true));
        assert_eq!(feature("SHADER_F16"), Some(false));
        assert_eq!(feature("TIMESTAMP_QUERY"), Some(false));
        assert!(text.contains("  cooperative matrices: none\n"), "{text}");
        assert!(
            text.contains("dense kernel on them") && text.contains("no (lacks"),
            "{text}"
        );
    }

    #[test]
    fn report_lists_cooperative_matrix_shapes() {
        use wgpu::CooperativeScalarType::{F16, F32};
        let mut info = wgpu::AdapterInfo::new(wgpu::DeviceType::DiscreteGpu, wgpu::Backend::Vulkan);
        info.name = "NVIDIA H200".into();
        (info.subgroup_min_size, info.subgroup_max_size) = (32, 32);
        let shape = |size, ab, cr| wgpu::CooperativeMatrixProperties {
            m_size: size,
            n_size: size,
            k_size: size,
            ab_type: ab,
            cr_type: cr,
            saturating_accumulation: false,
        };
        let mut report = AdapterSummary {
            info,
            limits: wgpu::Limits::default(),
            features: wgpu::Features::SHADER_F16
                | wgpu::Features::SUBGROUP
                | wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX,
            unsupported: None,
            cooperative_matrix: vec![shape(16, F16, F16), shape(16, F16, F32)],
        };
        let text = format_report(0, &report);
        assert!(
            text.contains("  cooperative matrices: 16x16x16 f16->f16, 16x16x16 f16->f32\n"),
            "{text}"
        );
        assert!(
            text.contains("yes, 16x16x16 f16->f32 with subgroups of 32 (opt-in)"),
            "{text}"
        );
        // Metal's f32-only list: shapes shown, the kernel says why not.
        report.cooperative_matrix = vec![shape(8, F32, F32)];
        let text = format_report(0, &report);
        assert!(
            text.contains("cooperative matrices: 8x8x8 f32->f32"),
            "{text}"
        );
        assert!(
            text.contains("no (lacks a 16x16x16 or 8x8x8 f16->f32 shape"),
            "{text}"
        );
    }

    #[test]
    fn an_adapter_without_compute_gets_one_clear_line() {
        // What wgpu reports for a GL 3.3 context: no compute shaders, no storage buffers.
        let downlevel = wgpu::DownlevelCapabilities {
            flags: wgpu::DownlevelFlags::empty(),
            ..Default::default()
        };
        let limits = wgpu::Limits {
            max_storage_buffers_per_shader_stage: 0,
            ..wgpu::Limits::downlevel_webgl2_defaults()
        };
        let why = multipole_attn::gpu::compute_support(&downlevel, &limits).unwrap_err();
        assert!(
            why.contains("compute shaders") && why.contains("8 storage buffers"),
            "{why}"
        );
        let full = wgpu::DownlevelCapabilities::default();
        assert!(multipole_attn::gpu::compute_support(&full, &wgpu::Limits::default()).is_ok());
        let report = AdapterSummary {
            info: wgpu::AdapterInfo::new(wgpu::DeviceType::Other, wgpu::Backend::Gl),
            limits,
            features: wgpu::Features::empty(),
            unsupported: Some(why),
            cooperative_matrix: Vec::new(),
        };
        let text = format_report(1, &report);
        let lines: Vec<&str> = text.lines().filter(|l| l.contains("unusable")).collect();
        assert_eq!(lines.len(), 1, "{text}");
        assert!(
            lines[0].contains("cannot run compute passes (lacks compute shaders"),
            "{text}"
        );
    }
}
