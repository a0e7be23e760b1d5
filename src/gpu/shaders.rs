//! WGSL sources, embedded at compile time so native and wasm ship identical text, and the
//! tiny `#import` step that splices `shaders/shared/*.wgsl` into a pass.
//!
//! Each pass is specialised by constants prepended as WGSL `const`s (workgroup size `WG`, key
//! tile `BK`, padded head dimension `D4`): fixed sizes let private and workgroup arrays be
//! sized exactly, and a pipeline is built once per distinct set (see `pipelines.rs`).

/// The passes of the library.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pass {
    /// Coarse keys and values (and coarse queries) of one level (`shaders/downsample.wgsl`).
    Downsample,
    /// The fused fine-query FMA pass, or the near field alone with coarse queries
    /// (`shaders/fine_attention.wgsl`).
    FineAttention,
    /// Exact dense attention (`shaders/dense_attention.wgsl`).
    DenseAttention,
    /// Backward: D = rowsum(dO * O) next to the LSE (`shaders/backward_delta.wgsl`).
    BackwardDelta,
    /// Backward: dQ of fine queries (`shaders/backward_dq.wgsl`).
    BackwardDq,
    /// Backward: dK, dV of the near field (`shaders/backward_dkv_fine.wgsl`).
    BackwardDkvFine,
    /// Backward: dK~, dV~ of one level's coarse keys (`shaders/backward_dkv_coarse.wgsl`).
    BackwardDkvCoarse,
    /// Backward: coarse gradients back through the downsampling
    /// (`shaders/downsample_backward.wgsl`).
    DownsampleBackward,
    /// Backward: gradients of one level's learned weights (`shaders/weights_backward.wgsl`).
    WeightsBackward,
    /// Coarse queries' attention to their far list at one level (`shaders/coarse_attention.wgsl`).
    CoarseAttention,
    /// Upsampling of every level's coarse-query results and the log-sum-exp merge into the near
    /// field (`shaders/upsample_merge.wgsl`).
    UpsampleMerge,
}

impl Pass {
    /// Every pass, for validation tests.
    pub const ALL: [Pass; 11] = [
        Pass::Downsample,
        Pass::FineAttention,
        Pass::DenseAttention,
        Pass::BackwardDelta,
        Pass::BackwardDq,
        Pass::BackwardDkvFine,
        Pass::BackwardDkvCoarse,
        Pass::DownsampleBackward,
        Pass::WeightsBackward,
        Pass::CoarseAttention,
        Pass::UpsampleMerge,
    ];

    /// The pass's own WGSL file, before imports.
    pub fn source(self) -> &'static str {
        match self {
            Pass::Downsample => include_str!("../../shaders/downsample.wgsl"),
            Pass::FineAttention => include_str!("../../shaders/fine_attention.wgsl"),
            Pass::DenseAttention => include_str!("../../shaders/dense_attention.wgsl"),
            Pass::BackwardDelta => include_str!("../../shaders/backward_delta.wgsl"),
            Pass::BackwardDq => include_str!("../../shaders/backward_dq.wgsl"),
            Pass::BackwardDkvFine => include_str!("../../shaders/backward_dkv_fine.wgsl"),
            Pass::BackwardDkvCoarse => include_str!("../../shaders/backward_dkv_coarse.wgsl"),
            Pass::DownsampleBackward => include_str!("../../shaders/downsample_backward.wgsl"),
            Pass::WeightsBackward => include_str!("../../shaders/weights_backward.wgsl"),
            Pass::CoarseAttention => include_str!("../../shaders/coarse_attention.wgsl"),
            Pass::UpsampleMerge => include_str!("../../shaders/upsample_merge.wgsl"),
        }
    }

    /// A short name for labels and errors.
    pub fn name(self) -> &'static str {
        match self {
            Pass::Downsample => "downsample",
            Pass::FineAttention => "fine_attention",
            Pass::DenseAttention => "dense_attention",
            Pass::BackwardDelta => "backward_delta",
            Pass::BackwardDq => "backward_dq",
            Pass::BackwardDkvFine => "backward_dkv_fine",
            Pass::BackwardDkvCoarse => "backward_dkv_coarse",
            Pass::DownsampleBackward => "downsample_backward",
            Pass::WeightsBackward => "weights_backward",
            Pass::CoarseAttention => "coarse_attention",
            Pass::UpsampleMerge => "upsample_merge",
        }
    }
}

/// A shared snippet by its `#import` name.
fn shared(name: &str) -> Option<&'static str> {
    match name {
        "params" => Some(include_str!("../../shaders/shared/params.wgsl")),
        "geometry" => Some(include_str!("../../shaders/shared/geometry.wgsl")),
        "level_select" => Some(include_str!("../../shaders/shared/level_select.wgsl")),
        "online_softmax" => Some(include_str!("../../shaders/shared/online_softmax.wgsl")),
        "key_tiles" => Some(include_str!("../../shaders/shared/key_tiles.wgsl")),
        "coarse_tiles" => Some(include_str!("../../shaders/shared/coarse_tiles.wgsl")),
        "near_field" => Some(include_str!("../../shaders/shared/near_field.wgsl")),
        "far_field" => Some(include_str!("../../shaders/shared/far_field.wgsl")),
        "backward_queries" => Some(include_str!("../../shaders/shared/backward_queries.wgsl")),
        _ => None,
    }
}

/// Specialisation constants of one pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Specialization {
    /// Invocations per workgroup (one query row each in the attention passes).
    pub wg: u32,
    /// Keys per tile staged in workgroup memory (attention passes; ignored by downsample).
    pub bk: u32,
    /// Head dimension rounded up to vec4s: ceil(d / 4) (attention passes).
    pub d4: u32,
}

/// The full WGSL text of `pass` with its constants and imports resolved (no subgroup
/// operations: the variant every device can run).
pub fn compose(pass: Pass, spec: Specialization) -> String {
    compose_for(pass, spec, None)
}

/// Like [`compose`], for a device that runs subgroup operations with subgroups of (at least)
/// `subgroup` invocations when it is `Some`: the attention passes then read the staged key and
/// value tiles cooperatively, one element per lane, and share them by subgroup shuffles
/// (`shared/tile_rows_subgroup.wgsl`). Why: on lavapipe every workgroup-memory load is a loop
/// over the SIMD lanes, so loading each element once per subgroup instead of once per
/// invocation is what the kernels are bound by (docs/perf.md). Passes without key tiles are
/// unaffected. The text is valid only on a device with `Features::SUBGROUP`.
pub fn compose_for(pass: Pass, spec: Specialization, subgroup: Option<u32>) -> String {
    let mut out = format!(
        "// {} (generated: WG = {}, BK = {}, D4 = {})\nconst WG: u32 = {}u;\nconst BK: u32 = {}u;\nconst D4: u32 = {}u;\n",
        pass.name(),
        spec.wg,
        spec.bk,
        spec.d4,
        spec.wg,
        spec.bk,
        spec.d4
    );
    if let Some(sg) = subgroup {
        out.push_str(&format!("const SG: u32 = {sg}u;\n"));
    }
    push_resolved(&mut out, pass.source(), subgroup.is_some());
    match subgroup {
        Some(sg) => unroll_subgroup_loops(&out, spec.d4, sg),
        None => out,
    }
}

/// Resolves the `#import` lines of WGSL `text` against the library's shared snippets
/// (`shaders/shared/*.wgsl`, e.g. `#import geometry`), for tests and tools that build their own
/// WGSL on them. The plain variant: `#import tile_rows` gets the one without subgroups.
pub fn resolve_imports(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    push_resolved(&mut out, text, false);
    out
}

/// Writes out the `//#unroll` loops of `tile_rows_subgroup.wgsl` for `d4` and subgroup size
/// `sg`: WGSL's subgroupBroadcast takes only a constant lane, and the shuffle with a computed
/// lane was much slower on lavapipe (see the comments there).
fn unroll_subgroup_loops(text: &str, d4: u32, sg: u32) -> String {
    let mut out = String::with_capacity(text.len() + 256 * d4 as usize);
    for line in text.lines() {
        match line.trim() {
            "//#unroll dots" => {
                for c4 in 0..d4 {
                    let (t, j) = (c4 / sg, c4 % sg);
                    for k in 0..4 {
                        out.push_str(&format!(
                            "    d{k} += q_row[{c4}] * subgroupBroadcast(k{k}[{t}], {j}u);\n"
                        ));
                    }
                }
            }
            "//#unroll accumulate" => {
                for c4 in 0..d4 {
                    let (t, j) = (c4 / sg, c4 % sg);
                    let terms: Vec<String> = ["x", "y", "z", "w"]
                        .iter()
                        .enumerate()
                        .map(|(k, e)| {
                            format!(
                                "select(zero, w.{e} * subgroupBroadcast(v{k}[{t}], {j}u), ok.{e})"
                            )
                        })
                        .collect();
                    out.push_str(&format!("    acc[{c4}] += {};\n", terms.join(" + ")));
                }
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// Appends `text` with its `#import` lines replaced by the shared snippets (recursively: a
/// snippet may import another). `tile_rows` names the plain or the subgroup variant.
fn push_resolved(out: &mut String, text: &str, subgroup: bool) {
    for line in text.lines() {
        match line.trim().strip_prefix("#import ").map(str::trim) {
            Some("tile_rows") => push_resolved(
                out,
                if subgroup {
                    include_str!("../../shaders/shared/tile_rows_subgroup.wgsl")
                } else {
                    include_str!("../../shaders/shared/tile_rows_plain.wgsl")
                },
                subgroup,
            ),
            // Every import name is a literal in our own sources; an unknown one is a bug that
            // the naga validation test catches (the raw line is not valid WGSL).
            Some(name) => match shared(name) {
                Some(snippet) => push_resolved(out, snippet, subgroup),
                None => {
                    out.push_str(line);
                    out.push('\n');
                }
            },
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validate(src: &str) -> Result<naga::Module, String> {
        let module = naga::front::wgsl::parse_str(src).map_err(|e| e.emit_to_string(src))?;
        naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::empty(),
        )
        .validate(&module)
        .map_err(|e| format!("{e:?}"))?;
        Ok(module)
    }

    #[test]
    fn every_pass_parses_and_validates_without_a_gpu() {
        for pass in Pass::ALL {
            for &(wg, bk, d4) in &[
                (1, 1, 1),
                (4, 16, 4),
                (64, 31, 16),
                (64, 15, 32),
                (256, 8, 64),
            ] {
                let src = compose(pass, Specialization { wg, bk, d4 });
                if let Err(e) = validate(&src) {
                    panic!(
                        "{} (wg {wg}, bk {bk}, d4 {d4}) does not validate:\n{e}",
                        pass.name()
                    );
                }
            }
        }
    }

    #[test]
    fn subgroup_variants_validate_with_subgroup_capabilities() {
        // The variant a device with Features::SUBGROUP gets, for subgroup sizes smaller than,
        // equal to and larger than the row (D4) and the workgroup.
        for pass in Pass::ALL {
            for &(wg, bk, d4) in &[(1, 1, 1), (4, 16, 4), (64, 31, 16), (256, 8, 64)] {
                for sg in [4, 8, 32, 128] {
                    let src = compose_for(pass, Specialization { wg, bk, d4 }, Some(sg));
                    assert!(!src.contains("//#unroll"), "{}: loop left", pass.name());
                    let module = naga::front::wgsl::parse_str(&src)
                        .unwrap_or_else(|e| panic!("{}: {}", pass.name(), e.emit_to_string(&src)));
                    naga::valid::Validator::new(
                        naga::valid::ValidationFlags::all(),
                        naga::valid::Capabilities::SUBGROUP,
                    )
                    .subgroup_stages(naga::valid::ShaderStages::COMPUTE)
                    .subgroup_operations(naga::valid::SubgroupOperationSet::all())
                    .validate(&module)
                    .unwrap_or_else(|e| {
                        panic!(
                            "{} (wg {wg}, bk {bk}, d4 {d4}, sg {sg}): {e:?}",
                            pass.name()
                        )
                    });
                }
            }
        }
    }

    #[test]
    fn geometry_stands_alone() {
        // No params, no bindings: a test shader or a 2D sibling can import it on its own.
        let src = resolve_imports("#import geometry\n");
        assert!(src.contains("fn far_run("));
        if let Err(e) = validate(&src) {
            panic!("geometry.wgsl alone does not validate:\n{e}");
        }
    }

    #[test]
    fn imports_are_resolved() {
        for pass in Pass::ALL {
            let src = compose(
                pass,
                Specialization {
                    wg: 8,
                    bk: 8,
                    d4: 2,
                },
            );
            assert!(
                !src.contains("#import"),
                "{} keeps an unresolved import",
                pass.name()
            );
        }
    }
}
