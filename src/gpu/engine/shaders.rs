//! The WGSL text of a pass: its source (embedded at compile time by its descriptor in
//! `passes.rs`, so native and wasm ship identical text), the tiny `#import` step that splices
//! `shaders/shared/*.wgsl` into it, and its specialisation constants.
//!
//! Each pass is specialised by constants prepended as WGSL `const`s (workgroup size `WG`, key
//! tile `BK`, padded head dimension `D4`): fixed sizes let private and workgroup arrays be
//! sized exactly, and a pipeline is built once per distinct set (see `pipelines.rs`).

use crate::gpu::engine::passes::desc;
use crate::gpu::engine::storage_types::{
    f16_bindings, kept_partials, to_f16_storage_with, F16_DIRECTIVE,
};
use crate::plan::UNROLLED_D4;
pub use crate::plan::{Pass, Specialization};
use crate::storage::Storage;

/// A shared snippet by its `#import` name.
fn shared(name: &str) -> Option<&'static str> {
    match name {
        "params" => Some(include_str!("../../../shaders/shared/params.wgsl")),
        "geometry" => Some(include_str!("../../../shaders/shared/geometry.wgsl")),
        "level_select" => Some(include_str!("../../../shaders/shared/level_select.wgsl")),
        "sequences" => Some(include_str!("../../../shaders/shared/sequences.wgsl")),
        "problems" => Some(include_str!("../../../shaders/shared/problems.wgsl")),
        "combine_tree" => Some(include_str!("../../../shaders/shared/combine_tree.wgsl")),
        "pool_units" => Some(include_str!("../../../shaders/shared/pool_units.wgsl")),
        "online_softmax" => Some(include_str!("../../../shaders/shared/online_softmax.wgsl")),
        "key_tiles" => Some(include_str!("../../../shaders/shared/key_tiles.wgsl")),
        "coarse_tiles" => Some(include_str!("../../../shaders/shared/coarse_tiles.wgsl")),
        "near_field" => Some(include_str!("../../../shaders/shared/near_field.wgsl")),
        "far_field" => Some(include_str!("../../../shaders/shared/far_field.wgsl")),
        "far_keys" => Some(include_str!("../../../shaders/shared/far_keys.wgsl")),
        "tiled_rows" => Some(include_str!("../../../shaders/shared/tiled_rows.wgsl")),
        "decode_params" => Some(include_str!("../../../shaders/shared/decode_params.wgsl")),
        "decode_softmax" => Some(include_str!("../../../shaders/shared/decode_softmax.wgsl")),
        "decode_attend" => Some(include_str!("../../../shaders/shared/decode_attend.wgsl")),
        "decode_cache" => Some(include_str!("../../../shaders/shared/decode_cache.wgsl")),
        "dense_causal" => Some(include_str!("../../../shaders/shared/dense_causal.wgsl")),
        "variants" => Some(include_str!("../../../shaders/shared/variants.wgsl")),
        "backward_queries" => Some(include_str!(
            "../../../shaders/shared/backward_queries.wgsl"
        )),
        "subgroup_rows" => Some(include_str!("../../../shaders/shared/subgroup_rows.wgsl")),
        "subgroup_key_rows" => Some(include_str!(
            "../../../shaders/shared/subgroup_key_rows.wgsl"
        )),
        _ => None,
    }
}

/// A snippet with a plain and a subgroup variant, by its `#import` name: the sweeps over the
/// staged tile rows of the forward (`tile_rows`: online_softmax's consume_tile), of the dQ pass
/// (`dq_rows`), of the dK/dV pass of fine keys (`dkv_rows`) and of coarse keys
/// (`dkv_coarse_rows`).
fn variant(name: &str, subgroup: bool) -> Option<&'static str> {
    Some(match (name, subgroup) {
        ("tile_rows", false) => include_str!("../../../shaders/shared/tile_rows_plain.wgsl"),
        ("tile_rows", true) => include_str!("../../../shaders/shared/tile_rows_subgroup.wgsl"),
        ("dq_rows", false) => include_str!("../../../shaders/shared/dq_rows_plain.wgsl"),
        ("dq_rows", true) => include_str!("../../../shaders/shared/dq_rows_subgroup.wgsl"),
        ("dkv_rows", false) => include_str!("../../../shaders/shared/dkv_rows_plain.wgsl"),
        ("dkv_rows", true) => include_str!("../../../shaders/shared/dkv_rows_subgroup.wgsl"),
        ("dkv_coarse_rows", false) => {
            include_str!("../../../shaders/shared/dkv_coarse_rows_plain.wgsl")
        }
        ("dkv_coarse_rows", true) => {
            include_str!("../../../shaders/shared/dkv_coarse_rows_subgroup.wgsl")
        }
        _ => return None,
    })
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
    compose_with(pass, spec, subgroup, true)
}

/// [`compose_for`] for a device whose subgroups have at least `subgroup` invocations when
/// `exact`, or may have fewer (the kernels composed for a larger size than the adapter's
/// smallest, `ContextOptions::subgroup_size`). The passes with a per-subgroup check and a plain
/// fallback beside it do not depend on `exact`; the coarse dK~/dV~ pass's walk
/// (`shared/dkv_coarse_rows_subgroup.wgsl`), which has no fallback in its pipeline (a fallback
/// cost it 1.3-1.6x on llvmpipe, docs/perf.md change 28), runs only where `exact` holds, its
/// two-phase path elsewhere.
pub fn compose_with(
    pass: Pass,
    spec: Specialization,
    subgroup: Option<u32>,
    exact: bool,
) -> String {
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
        out.push_str(&format!(
            "const SG: u32 = {sg}u;\nconst SG_EXACT: bool = {exact};\n"
        ));
    }
    if matches!(pass, Pass::DenseTiled | Pass::FineTiled) {
        // Its micro-tile (`plan::dense_tiled`): the planner sizes workgroups by the same numbers.
        out.push_str(&format!(
            "const TQ: u32 = {}u;\nconst LANES: u32 = {}u;\n",
            crate::plan::TILED_ROWS,
            crate::plan::TILED_LANES
        ));
    }
    // The softmax variants (`shared/variants.wgsl`): constant false in a plain pipeline, so the
    // compiler removes their branches and the plain kernels run the code they always did.
    let f = spec.softmax;
    out.push_str(&format!(
        "const SOFTCAP: bool = {};\nconst SINKS: bool = {};\nconst WINDOW: bool = {};\n",
        f.softcap, f.sinks, f.window
    ));
    push_resolved(&mut out, desc(pass).source, subgroup.is_some(), spec.grid);
    // The plain variant only: the subgroup variant's per-key sweeps are written out already
    // (`unroll_subgroup_loops`), and writing out its other row loops too made each of its
    // pipelines above d = 128 several times slower to build on llvmpipe (gpu_forward's d = 132
    // cases went from 154 s to 607 s in CI) for no loop-limit gain.
    if subgroup.is_none() && spec.d4 > UNROLLED_D4 as u32 {
        out = unroll_row_loops(&out, spec.d4);
    }
    let out = match subgroup {
        Some(sg) => unroll_subgroup_loops(&out, spec.d4, sg),
        None => out,
    };
    // f16 storage (issue 29) rewrites the loads and stores of the pass's tensors last, so the
    // f32 variant is exactly the text it was before storage types existed.
    match spec.storage {
        Storage::F32 => out,
        Storage::F16 => {
            // The dense forward keeps its partial O in f32 between key chunks, the dense
            // backward its partial gradients between parts.
            to_f16_storage_with(&out, &f16_bindings(pass), &kept_partials(pass))
        }
    }
}

/// The row-counting variant of [`compose_for`] (tests only: `GpuContext::counting_rows`): every
/// `//#rows(serial, total)` marker line of the pass and its snippets becomes a call that adds
/// `serial` to the invocation's count of rows read one after another (its running maximum over
/// the dispatch goes to word 0 of a per-dispatch counter at group 2) and `total` to the
/// dispatch's total (word 1). Without this variant the markers are comments: the normal
/// pipelines carry no trace of it.
pub fn compose_counting(
    pass: Pass,
    spec: Specialization,
    subgroup: Option<u32>,
    exact: bool,
) -> String {
    let text = compose_with(pass, spec, subgroup, exact);
    // WGSL's `enable` directives (f16 storage) must stay before the counter's declarations.
    let (directives, text) = match text.strip_prefix(F16_DIRECTIVE) {
        Some(rest) => (F16_DIRECTIVE, rest),
        None => ("", text.as_str()),
    };
    let mut out = format!("{directives}{ROW_COUNTER}");
    for line in text.lines() {
        match line.trim_start().strip_prefix("//#rows(") {
            Some(args) => {
                let indent = &line[..line.len() - line.trim_start().len()];
                out.push_str(&format!("{indent}count_rows({};\n", args.trim_end()));
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// The counter of [`compose_counting`]: group 2, one (max, total) pair per dispatch at a
/// dynamic offset.
const ROW_COUNTER: &str =
    "@group(2) @binding(0) var<storage, read_write> row_counts: array<atomic<u32>, 2>;
var<private> rows_read: u32 = 0u;
fn count_rows(serial: u32, total: u32) {
    rows_read += serial;
    atomicMax(&row_counts[0], rows_read);
    atomicAdd(&row_counts[1], total);
}
";

/// Resolves the `#import` lines of WGSL `text` against the library's shared snippets
/// (`shaders/shared/*.wgsl`, e.g. `#import geometry`), for tests and tools that build their own
/// WGSL on them. The plain variant: `#import tile_rows` gets the one without subgroups.
pub fn resolve_imports(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    push_resolved(&mut out, text, false, false);
    out
}

/// [`resolve_imports`] with `#import geometry` resolved to the 2D grid's index maps
/// (`shaders/shared/geometry_grid.wgsl`, algorithm.md §9), as a 2D plan composes its passes.
pub fn resolve_imports_grid(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    push_resolved(&mut out, text, false, true);
    out
}

/// The first line of a loop over a row's D4 vec4s, as every pass writes it.
const ROW_LOOP: &str = "for (var c4 = 0u; c4 < D4; c4++) {";

/// Writes out every loop over a row's vec4s (a line [`ROW_LOOP`], its body, a line `}`) as `d4`
/// blocks `{ let c4 = ..u; body }`: the same statements in the same order, so the same results,
/// without a loop. Why: llvmpipe (lavapipe and Mesa's GL, the CI's and the web's path) stops an
/// invocation's loops after 65535 iterations counted over the whole invocation and then returns
/// wrong results; it unrolls these loops itself up to D4 = [`UNROLLED_D4`] but not above, where
/// they cost a key ~2 D4 + 8 iterations (at d = 256 the fine pass was wrong from m = 192 on;
/// docs/perf.md, change 10). Applied to the plain variant only, above `UNROLLED_D4`: smaller
/// heads and the subgroup variant compile the text they always did.
fn unroll_row_loops(text: &str, d4: u32) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = String::with_capacity(text.len() * 2);
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        if line.trim() != ROW_LOOP {
            out.push_str(line);
            out.push('\n');
            i += 1;
            continue;
        }
        let indent = &line[..line.len() - line.trim_start().len()];
        // The body: up to the line that closes the loop's brace.
        let mut depth = 1i32;
        let mut end = i + 1;
        while end < lines.len() {
            let l = lines[end];
            depth += l.matches('{').count() as i32 - l.matches('}').count() as i32;
            if depth == 0 {
                break;
            }
            end += 1;
        }
        assert!(end < lines.len(), "a row loop without its closing brace");
        for c4 in 0..d4 {
            out.push_str(&format!("{indent}{{\n{indent}    let c4 = {c4}u;\n"));
            for l in &lines[i + 1..end] {
                out.push_str(l);
                out.push('\n');
            }
            out.push_str(indent);
            out.push_str("}\n");
        }
        i = end + 1;
    }
    out
}

/// The marker of a statement template that [`unroll_subgroup_loops`] writes out once per vec4
/// of a row.
const EACH_C4: &str = "//#each_c4 ";

/// Writes out the `//#each_c4 <statements>` lines of the subgroup snippets
/// (`shaders/shared/*_subgroup.wgsl`) once per c4 < `d4`, with `{c4}` replaced by c4, `{t}` by
/// c4 / `sg` (the lane's share of a row holding element c4) and `{j}` by c4 % `sg` (the lane
/// that holds it): WGSL's subgroupBroadcast takes only a constant lane, and the shuffle with a
/// computed lane was much slower on lavapipe (docs/perf.md, change 5).
fn unroll_subgroup_loops(text: &str, d4: u32, sg: u32) -> String {
    let mut out = String::with_capacity(text.len() + 1024 * d4 as usize);
    for line in text.lines() {
        let Some(template) = line.trim().strip_prefix(EACH_C4) else {
            out.push_str(line);
            out.push('\n');
            continue;
        };
        let indent = &line[..line.len() - line.trim_start().len()];
        for c4 in 0..d4 {
            let (t, j) = (c4 / sg, c4 % sg);
            out.push_str(indent);
            out.push_str(
                &template
                    .replace("{c4}", &c4.to_string())
                    .replace("{t}", &t.to_string())
                    .replace("{j}", &j.to_string()),
            );
            out.push('\n');
        }
    }
    out
}

/// Appends `text` with its `#import` lines replaced by the shared snippets (recursively: a
/// snippet may import another). The names of [`variant`] get the plain or the subgroup snippet,
/// `geometry` the 1D or (`grid`) the 2D index maps.
fn push_resolved(out: &mut String, text: &str, subgroup: bool, grid: bool) {
    for line in text.lines() {
        let import = line.trim().strip_prefix("#import ").map(str::trim);
        if let Some(snippet) = import.and_then(|name| variant(name, subgroup)) {
            push_resolved(out, snippet, subgroup, grid);
            continue;
        }
        match import {
            Some("geometry") if grid => push_resolved(
                out,
                include_str!("../../../shaders/shared/geometry_grid.wgsl"),
                subgroup,
                grid,
            ),
            // Every import name is a literal in our own sources; an unknown one is a bug that
            // the naga validation test catches (the raw line is not valid WGSL).
            Some(name) => match shared(name) {
                Some(snippet) => push_resolved(out, snippet, subgroup, grid),
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
    use crate::plan::SoftmaxFlags;
    use crate::storage::Storage;

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

    /// The passes a 2D plan schedules (`FmaPlan` with a grid), composed with the grid's index
    /// maps: `geometry_grid.wgsl` must define what they call from `geometry.wgsl`.
    #[test]
    fn grid_passes_parse_and_validate() {
        for pass in [
            Pass::Downsample,
            Pass::FineAttention,
            Pass::FineTiled,
            Pass::CoarseAttention,
            Pass::UpsampleMerge,
            Pass::BackwardDq,
            Pass::BackwardDkvFine,
            Pass::BackwardDkvCoarse,
            Pass::DownsampleBackward,
            Pass::WeightsBackward,
        ] {
            for &(wg, bk, d4) in &[(1, 1, 1), (64, 31, 16), (256, 8, 64)] {
                let spec = Specialization {
                    wg,
                    bk,
                    d4,
                    grid: true,
                    softmax: SoftmaxFlags::PLAIN,
                    storage: Storage::F32,
                };
                let src = compose(pass, spec);
                assert!(src.contains("fn cells_of"), "{}: not the grid", pass.name());
                if let Err(e) = validate(&src) {
                    panic!("{} 2D (wg {wg}) does not validate:\n{e}", pass.name());
                }
                for sg in [4, 32] {
                    let src = compose_for(pass, spec, Some(sg));
                    naga::front::wgsl::parse_str(&src)
                        .unwrap_or_else(|e| panic!("{}: {}", pass.name(), e.emit_to_string(&src)));
                }
            }
        }
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
                let src = compose(
                    pass,
                    Specialization {
                        wg,
                        bk,
                        d4,
                        grid: false,
                        softmax: SoftmaxFlags::PLAIN,
                        storage: Storage::F32,
                    },
                );
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
                    let src = compose_for(
                        pass,
                        Specialization {
                            wg,
                            bk,
                            d4,
                            grid: false,
                            softmax: SoftmaxFlags::PLAIN,
                            storage: Storage::F32,
                        },
                        Some(sg),
                    );
                    assert!(
                        !src.contains("//#each_c4"),
                        "{}: template left",
                        pass.name()
                    );
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

    /// The f16-storage variant of every pass (issue 29), plain and subgroup, validates with
    /// naga's f16 capability; a pass without f16 tensors composes its f32 text; and the f32
    /// variant never mentions f16.
    #[test]
    fn f16_storage_variants_validate() {
        for pass in Pass::ALL {
            for &(wg, bk, d4) in &[(1, 1, 1), (64, 31, 16), (64, 8, 33)] {
                let spec = Specialization {
                    wg,
                    bk,
                    d4,
                    grid: false,
                    softmax: SoftmaxFlags::PLAIN,
                    storage: Storage::F16,
                };
                let f32_spec = Specialization {
                    storage: Storage::F32,
                    ..spec
                };
                for sg in [None, Some(8)] {
                    let src = compose_for(pass, spec, sg);
                    let plain = compose_for(pass, f32_spec, sg);
                    assert!(!plain.contains("f16"), "{}", pass.name());
                    if crate::gpu::engine::storage_types::f16_bindings(pass).is_empty() {
                        assert_eq!(src, plain, "{}", pass.name());
                        continue;
                    }
                    assert!(src.contains("array<f16>"), "{}", pass.name());
                    let module = naga::front::wgsl::parse_str(&src)
                        .unwrap_or_else(|e| panic!("{}: {}", pass.name(), e.emit_to_string(&src)));
                    naga::valid::Validator::new(
                        naga::valid::ValidationFlags::all(),
                        naga::valid::Capabilities::SUBGROUP
                            | naga::valid::Capabilities::SHADER_FLOAT16,
                    )
                    .subgroup_stages(naga::valid::ShaderStages::COMPUTE)
                    .subgroup_operations(naga::valid::SubgroupOperationSet::all())
                    .validate(&module)
                    .unwrap_or_else(|e| panic!("{} f16 (d4 {d4}, sg {sg:?}): {e:?}", pass.name()));
                }
                // The counting variant keeps `enable f16;` first.
                let counting = compose_counting(pass, spec, None, true);
                naga::front::wgsl::parse_str(&counting).unwrap_or_else(|e| {
                    panic!("{} counting: {}", pass.name(), e.emit_to_string(&counting))
                });
            }
        }
    }

    #[test]
    fn plain_row_loops_are_written_out_above_d_128_only() {
        for pass in Pass::ALL {
            let spec = |d4| Specialization {
                wg: 64,
                bk: 7,
                d4,
                grid: false,
                softmax: SoftmaxFlags::PLAIN,
                storage: Storage::F32,
            };
            // Up to D4 = 32 the text is what it always was (llvmpipe unrolls those itself).
            let small = compose(pass, spec(UNROLLED_D4 as u32));
            assert!(!small.contains("let c4 = 0u;"), "{}", pass.name());
            // The plain variant writes them out above it; the subgroup variant keeps its text.
            let wide = compose_for(pass, spec(UNROLLED_D4 as u32 + 1), None);
            assert!(!wide.contains(ROW_LOOP), "{}: a row loop left", pass.name());
            if small.contains(ROW_LOOP) {
                assert!(wide.contains("let c4 = 32u;"), "{}", pass.name());
            }
            let sub = compose_for(pass, spec(UNROLLED_D4 as u32 + 1), Some(8));
            assert!(!sub.contains("let c4 = 0u;"), "{}", pass.name());
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
        let src = resolve_imports_grid("#import geometry\n");
        assert!(src.contains("fn level_far_run("));
        if let Err(e) = validate(&src) {
            panic!("geometry_grid.wgsl alone does not validate:\n{e}");
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
                    grid: false,
                    softmax: SoftmaxFlags::PLAIN,
                    storage: Storage::F32,
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

#[cfg(test)]
mod descriptors {
    use super::compose;
    use crate::gpu::engine::passes::{desc, Access, Access::*};
    use crate::plan::{Pass, SoftmaxFlags, Specialization};
    use crate::storage::Storage;

    /// WebGPU's default limit of storage buffers per shader stage.
    const MAX_STORAGE_PER_STAGE: usize = 8;
    /// The most an f16 variant binds: the dense dK/dV pass with its f32 partial dK and dV.
    const F16_MAX_STORAGE_PER_STAGE: usize = 10;

    /// Every global buffer of the composed WGSL of `storage`: (group, binding, name, access).
    fn reflect(pass: Pass, storage: Storage) -> Vec<(u32, u32, String, Access)> {
        let spec = Specialization {
            wg: 64,
            bk: 8,
            d4: 4,
            grid: false,
            softmax: SoftmaxFlags::PLAIN,
            storage,
        };
        let src = compose(pass, spec);
        let module = naga::front::wgsl::parse_str(&src).expect("shader parses");
        let mut out: Vec<_> = module
            .global_variables
            .iter()
            .filter_map(|(_, g)| {
                let b = g.binding.as_ref()?;
                let access = match g.space {
                    naga::AddressSpace::Uniform => Uniform,
                    naga::AddressSpace::Storage { access } => {
                        if access.contains(naga::StorageAccess::STORE) {
                            ReadWrite
                        } else {
                            Read
                        }
                    }
                    _ => return None,
                };
                Some((
                    b.group,
                    b.binding,
                    g.name.clone().unwrap_or_default(),
                    access,
                ))
            })
            .collect();
        out.sort_by_key(|(g, b, _, _)| (*g, *b));
        out
    }

    /// Both storages: the f16 variant declares `passes::f16_only_bindings` too.
    #[test]
    fn every_descriptor_matches_its_wgsl_bindings() {
        for pass in Pass::ALL {
            for storage in [Storage::F32, Storage::F16] {
                let mut want: Vec<_> = crate::gpu::engine::passes::bindings_for(pass, storage)
                    .iter()
                    .map(|b| (0, b.binding, b.name.to_string(), b.access))
                    .collect();
                if desc(pass).level_select {
                    want.push((1, 0, "sel".to_string(), Uniform));
                }
                assert_eq!(reflect(pass, storage), want, "{} {storage:?}", pass.name());
            }
        }
    }

    #[test]
    fn bindings_are_in_order_with_one_role_each_and_fit_the_browser() {
        for (pass, storage) in Pass::ALL
            .iter()
            .flat_map(|&p| [(p, Storage::F32), (p, Storage::F16)])
        {
            let b = &crate::gpu::engine::passes::bindings_for(pass, storage)[..];
            assert!(
                b.windows(2).all(|w| w[0].binding < w[1].binding),
                "{}",
                pass.name()
            );
            for (i, x) in b.iter().enumerate() {
                assert!(
                    b[i + 1..].iter().all(|y| y.role != x.role),
                    "{}: role {:?} bound twice",
                    pass.name(),
                    x.role
                );
            }
            // f16 storage never runs in a browser (no shader-f16 under browser limits): its
            // variants may bind more, up to F16_MAX_STORAGE_PER_STAGE; a device that allows
            // fewer refuses those with a typed error (`Kernels::group0_for`).
            let buffers = b.iter().filter(|x| x.access != Uniform).count();
            let max = match storage {
                Storage::F32 => MAX_STORAGE_PER_STAGE,
                Storage::F16 => F16_MAX_STORAGE_PER_STAGE,
            };
            assert!(buffers <= max, "{} {storage:?}", pass.name());
        }
    }
}
