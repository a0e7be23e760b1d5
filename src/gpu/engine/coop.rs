//! Cooperative matrices (tensor cores; issue 29): which of an adapter's shapes the library can
//! use, what `info` says about them, and the WGSL of the dense forward on them
//! (`shaders/dense_coop.wgsl`). Native only and opt-in
//! ([`crate::gpu::ContextOptions::cooperative_matrix`]): wgpu 30 gates the feature as
//! experimental, and the variant has not yet passed `doctor` on a real GPU.
//!
//! The shader needs square CM x CM matrices (the only sizes naga's WGSL spells:
//! `coop_mat8x8`, `coop_mat16x16`) with f16 A and B and an f32 accumulator, f16 workgroup
//! memory ([`wgpu::Features::SHADER_F16`]), and workgroups of exactly one subgroup (so a
//! subgroup size the adapter fixes: minimum = maximum).

use std::collections::HashMap;

use crate::error::{FmaError, Result};
use crate::gpu::engine::shaders::resolve_imports;
use crate::gpu::engine::storage_types::{to_f16_storage, F16_DIRECTIVE};
use crate::storage::Storage;

/// Whether to use cooperative matrices (tensor cores) where the adapter offers a fitting shape.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CoopMode {
    /// Never (the default until the variant has passed `doctor` on a real GPU).
    #[default]
    Off,
    /// Where the adapter offers a fitting shape ([`fitting_shape`]); silently not elsewhere.
    IfOffered,
    /// Always: a context on an adapter without a fitting shape is an error saying what it lacks.
    Required,
}

/// The cooperative-matrix shape the kernels run on: CM x CM x CM, f16 inputs, f32 accumulator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CoopShape {
    /// M = N = K: 8 or 16.
    pub size: u32,
    /// Invocations per subgroup, which is the workgroup size of the kernels.
    pub subgroup: u32,
}

/// The largest shape among `props` that the kernels can use (f16 x f16 + f32, M = N = K of 8
/// or 16), or `None`.
pub fn fitting_shape(props: &[wgpu::CooperativeMatrixProperties]) -> Option<u32> {
    use wgpu::CooperativeScalarType::{F16, F32};
    props
        .iter()
        .filter(|p| {
            p.ab_type == F16
                && p.cr_type == F32
                && p.m_size == p.n_size
                && p.n_size == p.k_size
                && matches!(p.m_size, 8 | 16)
        })
        .map(|p| p.m_size)
        .max()
}

/// The name of a cooperative scalar type, as `info` prints it.
fn scalar_name(t: wgpu::CooperativeScalarType) -> &'static str {
    use wgpu::CooperativeScalarType::*;
    match t {
        F32 => "f32",
        F16 => "f16",
        I32 => "i32",
        U32 => "u32",
    }
}

/// The shapes `props` lists, one `MxNxK a->c` each (e.g. `16x16x16 f16->f32`), comma
/// separated, `none` for an empty list: `multipole-attn info`'s line.
pub fn describe_shapes(props: &[wgpu::CooperativeMatrixProperties]) -> String {
    if props.is_empty() {
        return "none".into();
    }
    props
        .iter()
        .map(|p| {
            format!(
                "{}x{}x{} {}->{}{}",
                p.m_size,
                p.n_size,
                p.k_size,
                scalar_name(p.ab_type),
                scalar_name(p.cr_type),
                if p.saturating_accumulation {
                    " (saturating)"
                } else {
                    ""
                }
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// What an adapter offers that the cooperative-matrix kernels need.
#[derive(Clone, Debug)]
pub struct CoopOffer {
    /// [`wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX`] is among its features.
    pub feature: bool,
    /// [`wgpu::Features::SHADER_F16`] is among its features.
    pub f16: bool,
    /// Its shapes (`Adapter::cooperative_matrix_properties`).
    pub shapes: Vec<wgpu::CooperativeMatrixProperties>,
    /// Its subgroup sizes (minimum, maximum).
    pub subgroup: (u32, u32),
}

impl CoopOffer {
    /// What `adapter` offers.
    pub fn of(adapter: &wgpu::Adapter) -> Self {
        let info = adapter.get_info();
        let features = adapter.features();
        Self {
            feature: features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX),
            f16: features.contains(wgpu::Features::SHADER_F16),
            shapes: adapter.cooperative_matrix_properties(),
            subgroup: (info.subgroup_min_size, info.subgroup_max_size),
        }
    }

    /// The shape the kernels would run on, or what the adapter lacks (one line).
    pub fn choose(&self) -> std::result::Result<CoopShape, String> {
        let mut lacks = Vec::new();
        if !self.feature {
            lacks.push("Features::EXPERIMENTAL_COOPERATIVE_MATRIX".to_string());
        }
        if !self.f16 {
            lacks.push("Features::SHADER_F16".to_string());
        }
        let size = fitting_shape(&self.shapes);
        if size.is_none() {
            lacks.push(format!(
                "a 16x16x16 or 8x8x8 f16->f32 shape (offers {})",
                describe_shapes(&self.shapes)
            ));
        }
        let (lo, hi) = self.subgroup;
        if lo != hi || !(lo.is_power_of_two() && (8..=128).contains(&lo)) {
            lacks.push(format!(
                "a fixed subgroup size from 8 to 128 (has {lo} to {hi})"
            ));
        }
        match size {
            Some(size) if lacks.is_empty() => Ok(CoopShape { size, subgroup: lo }),
            _ => Err(format!("lacks {}", lacks.join(", "))),
        }
    }
}

/// The typed error of [`CoopMode::Required`] on an adapter without a fitting shape.
pub fn required_error(adapter: &str, why: String) -> FmaError {
    FmaError::InvalidConfig {
        what: "cooperative_matrix",
        value: "Required".into(),
        allowed: format!(
            "Off or IfOffered on {adapter}, which {why} (cooperative matrices are native only: \
             Vulkan with VK_KHR_cooperative_matrix, Metal's simdgroup matrices)"
        ),
    }
}

/// The device features the cooperative-matrix kernels need (the shape aside): the matrices and
/// f16 workgroup memory.
pub fn features() -> wgpu::Features {
    wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX | wgpu::Features::SHADER_F16
}

/// Tile sizes of one dense cooperative-matrix pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CoopSpec {
    /// M = N = K of the matrices (8 or 16).
    pub cm: u32,
    /// Query rows per workgroup (a multiple of `cm`).
    pub bq: u32,
    /// Keys per tile (a multiple of `cm`).
    pub bk: u32,
    /// The head dimension padded to a multiple of `cm`.
    pub dp: u32,
    /// Invocations per workgroup: one subgroup.
    pub wg: u32,
}

impl CoopSpec {
    /// Workgroup memory of the pipeline, in bytes: Q, K, V tiles and P in f16, scores and the
    /// output accumulator in f32.
    pub fn workgroup_bytes(&self) -> u64 {
        let (bq, bk, dp) = (self.bq as u64, self.bk as u64, self.dp as u64);
        2 * bq * dp + 2 * 2 * bk * dp + 4 * bq * bk + 2 * bq * bk + 4 * bq * dp
    }

    /// The largest tiles (64 or 32 or 16 query rows, 32 or 16 keys, at least one matrix each)
    /// for `head_dim` that fit `workgroup_bytes` of workgroup memory.
    pub fn choose(shape: CoopShape, head_dim: usize, workgroup_bytes: u32) -> Result<Self> {
        let cm = shape.size;
        let dp = (head_dim as u32).div_ceil(cm) * cm;
        let candidates = [(64, 32), (64, 16), (32, 32), (32, 16), (16, 16)];
        candidates
            .iter()
            .map(|&(bq, bk)| Self {
                cm,
                bq: (bq as u32).max(cm),
                bk: (bk as u32).max(cm),
                dp,
                wg: shape.subgroup,
            })
            .find(|s| head_dim > 0 && s.workgroup_bytes() <= workgroup_bytes as u64)
            .ok_or_else(|| FmaError::InvalidConfig {
                what: "head_dim",
                value: head_dim.to_string(),
                allowed: format!(
                    "1 ..= {} for the cooperative-matrix kernel ({workgroup_bytes} bytes of \
                     workgroup memory); use ContextOptions::cooperative_matrix = Off",
                    Self::max_head_dim(cm, workgroup_bytes)
                ),
            })
    }

    /// The largest head dimension the smallest tiles fit in `workgroup_bytes`.
    fn max_head_dim(cm: u32, workgroup_bytes: u32) -> u32 {
        let fits = |d: u32| {
            let s = Self {
                cm,
                bq: 16u32.max(cm),
                bk: 16u32.max(cm),
                dp: d,
                wg: 32,
            };
            s.workgroup_bytes() <= workgroup_bytes as u64
        };
        let mut d = 0;
        while fits(d + cm) {
            d += cm;
        }
        d
    }
}

/// The full WGSL of the dense forward on cooperative matrices for `spec`: the `enable` lines
/// (which must open a module), the constants and matrix aliases, then
/// `shaders/dense_coop.wgsl` with its imports resolved.
pub fn compose_dense_coop(spec: CoopSpec) -> String {
    let m = format!("coop_mat{0}x{0}", spec.cm);
    let mut out = format!(
        "enable f16;\nenable wgpu_cooperative_matrix;\n// dense_coop (generated: CM = {cm}, BQ = {bq}, BK = {bk}, DP = {dp}, WG = {wg})\n\
         const CM: u32 = {cm}u;\nconst BQ: u32 = {bq}u;\nconst BK: u32 = {bk}u;\nconst DP: u32 = {dp}u;\nconst WG: u32 = {wg}u;\n\
         alias MatA = {m}<f16, A>;\nalias MatB = {m}<f16, B>;\nalias MatC = {m}<f32, C>;\n",
        cm = spec.cm,
        bq = spec.bq,
        bk = spec.bk,
        dp = spec.dp,
        wg = spec.wg,
    );
    out.push_str(&resolve_imports(include_str!(
        "../../../shaders/dense_coop.wgsl"
    )));
    out
}

/// The tensors of `dense_coop.wgsl` stored as f16 under [`Storage::F16`] (its bindings of
/// roles Q, K, V, Out: the plain dense pass's, whose bind-group layout it shares).
const COOP_F16_TENSORS: [&str; 4] = ["q", "k", "v", "out"];

/// [`compose_dense_coop`] for tensors of `storage`: under [`Storage::F16`] the bindings of Q,
/// K, V and O are f16 (`storage_types::to_f16_storage`, the rewrite every pass's f16 variant
/// gets), so the staging loads convert f16 to f32 and back to the f16 the matrices take, which
/// is exact (a compiler may fold the pair into a plain load), and O is stored as f16. The f32
/// variant is [`compose_dense_coop`]'s text.
pub fn compose_dense_coop_for(spec: CoopSpec, storage: Storage) -> String {
    let text = compose_dense_coop(spec);
    match storage {
        Storage::F32 => text,
        // The rewrite puts `enable f16;` first itself.
        Storage::F16 => to_f16_storage(
            text.strip_prefix(F16_DIRECTIVE).unwrap_or(&text),
            &COOP_F16_TENSORS,
        ),
    }
}

/// [`compose_dense_coop_emulated`] for tensors of `storage` (f16: the bindings rewritten after
/// the emulation, so the emulated kernel then needs `SHADER_F16` for them, which the test
/// adapter, lavapipe, has).
pub fn compose_dense_coop_emulated_for(spec: CoopSpec, storage: Storage) -> String {
    let text = compose_dense_coop_emulated(spec);
    match storage {
        Storage::F32 => text,
        Storage::F16 => to_f16_storage(&text, &COOP_F16_TENSORS),
    }
}

/// Tiles for [`compose_dense_coop_emulated`]: the smallest (BQ = 2 CM, BK = CM), so that an
/// invocation's emulated multiply-adds per key tile stay few under llvmpipe's loop limit (the
/// key range is cut into dispatches by [`emulated_keys_per_dispatch`]).
pub fn emulation_spec(shape: CoopShape, head_dim: usize) -> CoopSpec {
    let cm = shape.size;
    CoopSpec {
        cm,
        bq: 2 * cm,
        bk: cm,
        dp: (head_dim.max(1) as u32).div_ceil(cm) * cm,
        wg: shape.subgroup,
    }
}

/// The workgroup arrays of `dense_coop.wgsl` that cooperative operations read or write.
const COOP_ARRAYS: [&str; 6] = ["qs", "ks", "vs", "ss", "ps", "os"];

/// [`compose_dense_coop`] with every cooperative-matrix operation emulated by scalar WGSL, so
/// the kernel's logic (tiling, strides, row/column-major, masks, the online softmax) runs on
/// an adapter without cooperative matrices (lavapipe, the CI's): tests only
/// (`GpuContext::emulating_cooperative_matrix`). f16 values are f32s rounded to f16's
/// precision by bit operations, so neither feature is needed.
///
/// How ([`emulation`]): an A or B matrix is a view (`EmuView`: offset, stride, row- or
/// column-major) of the workgroup array it was loaded from, which no one writes while the view
/// is used (the kernel's barriers); the multiply-add reads its elements there. An accumulator
/// (C) is the invocation's share of its elements (`EmuAcc`: elements `lane, lane + WG, ..` of
/// the CM x CM, row-major), which the invocation alone loads, computes and stores: llvmpipe runs
/// a workgroup's lanes in batches between barriers, so a lane may load an output tile another
/// lane already updated, but never an element of it that it uses. No matrix is a private array
/// of CM x CM values indexed at run time (the first emulation's: llvmpipe took minutes to compile
/// it at CM = 16), and each invocation's loops stay short (llvmpipe's loop limit:
/// [`emulated_loop_iterations`], [`emulated_keys_per_dispatch`]).
pub fn compose_dense_coop_emulated(spec: CoopSpec) -> String {
    let text = compose_dense_coop(spec);
    let mut out = format!(
        "struct EmuView {{ at: u32, stride: u32, row_major: bool }}\n\
         struct EmuAcc {{ e: array<f32, {share}> }}\n\
         alias MatA = EmuView;\nalias MatB = EmuView;\nalias MatC = EmuAcc;\n\
         var<private> emu_lane: u32;\n",
        share = emulated_share(spec)
    );
    // The array each A or B view was loaded from, by variable name (the latest binding).
    let mut source: HashMap<String, String> = HashMap::new();
    let mut pairs: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if line.starts_with("enable ") || line.starts_with("alias Mat") {
            continue;
        }
        let line = line
            .replace("array<f16, ", "array<f32, ")
            .replace("f16(", "emu_f16(");
        let line = emulate_mad(&line, &source, &mut pairs);
        let (line, view) = emulate_call(&line);
        if let Some((var, array)) = view {
            source.insert(var, array);
        }
        out.push_str(&line);
        out.push('\n');
        if line.trim_start().starts_with("fn main(") {
            out.push_str("    emu_lane = lid;\n");
        }
    }
    out.push_str(&emulation(spec, &pairs));
    out
}

/// The elements of a CM x CM accumulator each invocation of the emulation owns (the last
/// lanes may own fewer: an element index past CM x CM is skipped).
fn emulated_share(spec: CoopSpec) -> u32 {
    (spec.cm * spec.cm).div_ceil(spec.wg)
}

/// `line` with `coopMultiplyAdd(a, b, c)` written as `emu_mad_A_B(a, b, c)`, A and B the
/// arrays the views `a` and `b` were loaded from (`source`); each new pair joins `pairs`.
fn emulate_mad(
    line: &str,
    source: &HashMap<String, String>,
    pairs: &mut Vec<(String, String)>,
) -> String {
    let Some(at) = line.find("coopMultiplyAdd(") else {
        return line.to_string();
    };
    let args = &line[at + "coopMultiplyAdd(".len()..];
    let names: Vec<&str> = args.split([',', ')']).map(str::trim).take(2).collect();
    let array = |v: &str| {
        source
            .get(v)
            .unwrap_or_else(|| panic!("emulation: `{v}` is no loaded A or B matrix: {line}"))
            .clone()
    };
    let pair = (array(names[0]), array(names[1]));
    let call = format!("emu_mad_{}_{}(", pair.0, pair.1);
    if !pairs.contains(&pair) {
        pairs.push(pair);
    }
    line.replacen("coopMultiplyAdd(", &call, 1)
}

/// `line` with a cooperative load `coopLoad[T]<M>(&NAME[i], s)` written as
/// `emu_view(row_major, i, s)` (M an A or B matrix; the view's variable and NAME are
/// returned) or `emu_load_NAME(row_major, i, s)` (an accumulator), and a store
/// `coopStoreT(m, &NAME[i], s)` as `emu_store_NAME(m, i, s)` (the shader's indices hold no
/// brackets).
fn emulate_call(line: &str) -> (String, Option<(String, String)>) {
    let (head, row_major, rest) = if let Some(at) = line.find("coopLoadT<") {
        (&line[..at], Some(true), &line[at..])
    } else if let Some(at) = line.find("coopLoad<") {
        (&line[..at], Some(false), &line[at..])
    } else if let Some(at) = line.find("coopStoreT(") {
        (&line[..at], None, &line[at + "coopStoreT(".len()..])
    } else {
        return (line.to_string(), None);
    };
    let amp = rest.find('&').expect("a cooperative call takes a pointer");
    let open = rest.find('[').expect("a pointer to an array element");
    let close = rest.find(']').expect("a closing bracket");
    let name = &rest[amp + 1..open];
    let index = &rest[open + 1..close];
    let tail = &rest[close + 1..];
    match row_major {
        Some(r) if !rest.starts_with("coopLoadT<MatC>") && !rest.starts_with("coopLoad<MatC>") => {
            // `let a = coopLoad..`: the view's variable.
            let var = head
                .trim()
                .trim_start_matches("let ")
                .trim_start_matches("var ")
                .trim_end_matches('=')
                .trim()
                .to_string();
            (
                format!("{head}emu_view({r}, {index}{tail}"),
                Some((var, name.to_string())),
            )
        }
        Some(r) => (format!("{head}emu_load_{name}({r}, {index}{tail}"), None),
        None => {
            let matrix = rest[..amp].trim_end().trim_end_matches(',');
            (
                format!("{head}emu_store_{name}({matrix}, {index}{tail}"),
                None,
            )
        }
    }
}

/// x rounded to f16's precision, the emulation's stand-in for `f16(x)`.
const EMULATED_F16: &str = "
// x rounded to f16's 11 significant bits, to nearest even (f16's range is not emulated: no
// subnormals, no overflow; unpack2x16float would need SHADER_F16_IN_F32).
fn emu_f16(x: f32) -> f32 {
    let b = bitcast<u32>(x);
    let lsb = (b >> 13u) & 1u;
    return bitcast<f32>((b + 0xfffu + lsb) & 0xffffe000u);
}
";

/// The scalar stand-ins of the emulated kernel ([`compose_dense_coop_emulated`]): f16
/// rounding, views, the accumulator loads and stores of every workgroup array of
/// [`COOP_ARRAYS`], and C + A B for each (A array, B array) of `pairs`. Lane `emu_lane` owns
/// element `e = lane + s WG` (row e / CM, column e % CM) as `e[s]` of every accumulator;
/// C + A B's element (i, j) reads row i of A and column j of B from their arrays, sums in the
/// order k = 0, 1, .. (written out).
fn emulation(spec: CoopSpec, pairs: &[(String, String)]) -> String {
    let mut out = format!(
        "{EMULATED_F16}
fn emu_view(row_major: bool, at: u32, stride: u32) -> EmuView {{
    return EmuView(at, stride, row_major);
}}
// The index of element (r, c) of the view m in its array.
fn emu_at(m: EmuView, r: u32, c: u32) -> u32 {{
    return select(m.at + c * m.stride + r, m.at + r * m.stride + c, m.row_major);
}}
"
    );
    let share = emulated_share(spec);
    for (a, b) in pairs {
        let terms: String = (0..spec.cm)
            .map(|k| {
                format!("            s += {a}[emu_at(a, row, {k}u)] * {b}[emu_at(b, {k}u, col)];\n")
            })
            .collect();
        out.push_str(&format!(
            "
fn emu_mad_{a}_{b}(a: EmuView, b: EmuView, c: EmuAcc) -> EmuAcc {{
    var r = c;
    for (var j = 0u; j < {share}u; j++) {{
        let e = emu_lane + j * WG;
        if (e < CM * CM) {{
            let row = e / CM;
            let col = e % CM;
            var s = r.e[j];
{terms}            r.e[j] = s;
        }}
    }}
    return r;
}}
"
        ));
    }
    for name in COOP_ARRAYS {
        out.push_str(
            &format!(
                "
fn emu_load_NAME(row_major: bool, at: u32, stride: u32) -> EmuAcc {{
    var m: EmuAcc;
    let v = EmuView(at, stride, row_major);
    for (var j = 0u; j < {share}u; j++) {{
        let e = emu_lane + j * WG;
        if (e < CM * CM) {{
            m.e[j] = NAME[emu_at(v, e / CM, e % CM)];
        }}
    }}
    return m;
}}
fn emu_store_NAME(m: EmuAcc, at: u32, stride: u32) {{
    for (var j = 0u; j < {share}u; j++) {{
        let e = emu_lane + j * WG;
        if (e < CM * CM) {{
            NAME[at + e / CM * stride + e % CM] = m.e[j];
        }}
    }}
}}
"
            )
            .replace("NAME", name),
        );
    }
    out
}

/// llvmpipe stops an invocation's loops after this many iterations in all (gallivm's
/// `LP_MAX_TGSI_LOOP_ITERATIONS`; perf.md, change 9) and goes on with wrong values, silently.
const LLVMPIPE_LOOP_LIMIT: u64 = 65535;

/// An upper bound on the loop iterations one invocation of the emulated kernel
/// ([`compose_dense_coop_emulated`]) runs for a head of dimension `d`: `(fixed, per_key_tile)`,
/// every loop of the composed text counted in full (none assumed unrolled), a loop's exit
/// test as one more iteration.
pub fn emulated_loop_iterations(spec: CoopSpec, d: u32) -> (u64, u64) {
    let (cm, bq, bk, dp, wg) = (
        spec.cm as u64,
        spec.bq as u64,
        spec.bk as u64,
        spec.dp as u64,
        spec.wg as u64,
    );
    let rpl = bq.div_ceil(wg);
    // emu_mad, emu_load_*, emu_store_*: a loop over the lane's share of the CM x CM elements
    // (A and B are views: no loop).
    let acc = (cm * cm).div_ceil(wg) + 1;
    let (rbs, kbs, cbs) = (bq / cm, bk / cm, dp / cm);
    // Q tile staged, running state set up, O and LSE written; the key loop's exit.
    let fixed = (bq * dp).div_ceil(wg) + 1 + (rpl + 1) + rpl * (d as u64 + 2) + 1 + 1;
    let stage = (bk * dp).div_ceil(wg) + 1;
    // S: per (rb, kb) a multiply-add per cb, then a store.
    let scores = rbs * (kbs * (cbs * acc + 1 + acc) + 1) + 1;
    let softmax = rpl * (1 + (bk + 1) + (bk + 1) + (dp + 1)) + 1;
    // O: per (rb, cb) a load, a multiply-add per kb, a store.
    let pv = rbs * (cbs * (acc + kbs * acc + 1 + acc) + 1) + 1;
    (fixed, 1 + stage + scores + softmax + pv)
}

/// The keys one dispatch of the emulated kernel may attend per query row (a multiple of
/// `spec.bk`) so that no invocation reaches llvmpipe's loop limit: at most half of it by
/// [`emulated_loop_iterations`]' bound (the margin covers what the count cannot see). A head
/// whose single key tile needs more is an error: the emulation cannot run it, and a wrong
/// answer would be silent.
pub fn emulated_keys_per_dispatch(spec: CoopSpec, d: u32) -> Result<u32> {
    let budget = LLVMPIPE_LOOP_LIMIT / 2;
    let (fixed, per_tile) = emulated_loop_iterations(spec, d);
    let tiles = budget.saturating_sub(fixed) / per_tile;
    if tiles == 0 {
        return Err(FmaError::LimitExceeded {
            what: format!(
                "loop iterations of one invocation of the emulated cooperative-matrix kernel \
                 (head_dim {d}, CM {})",
                spec.cm
            ),
            requested: fixed + per_tile,
            max: budget,
            unit: "iterations",
            advice: "emulate with 8 x 8 matrices or a smaller head_dim (llvmpipe stops an \
                     invocation's loops after 65535 iterations)"
                .into(),
        });
    }
    Ok((tiles.min(u32::MAX as u64 / spec.bk as u64) as u32) * spec.bk)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wgpu::CooperativeMatrixProperties as P;
    use wgpu::CooperativeScalarType::{F16, F32, I32};

    fn prop(size: u32, ab: wgpu::CooperativeScalarType, cr: wgpu::CooperativeScalarType) -> P {
        P {
            m_size: size,
            n_size: size,
            k_size: size,
            ab_type: ab,
            cr_type: cr,
            saturating_accumulation: false,
        }
    }

    /// What wgpu-core enables for a device with the cooperative-matrix feature and SHADER_F16.
    fn validate(src: &str) -> std::result::Result<(), String> {
        let module = naga::front::wgsl::parse_str(src).map_err(|e| e.emit_to_string(src))?;
        naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::COOPERATIVE_MATRIX
                | naga::valid::Capabilities::SHADER_FLOAT16,
        )
        .validate(&module)
        .map_err(|e| e.emit_to_string(src))?;
        Ok(())
    }

    #[test]
    fn coop_dense_composes_and_validates_for_every_shape_and_tile() {
        for (size, subgroup) in [(16, 32), (8, 32), (16, 64), (8, 8)] {
            let shape = CoopShape { size, subgroup };
            for head_dim in [1, 8, 33, 64, 100, 128, 256] {
                let spec = CoopSpec::choose(shape, head_dim, 48 * 1024).unwrap();
                let src = compose_dense_coop(spec);
                assert!(!src.contains("#import"));
                assert!(src.starts_with("enable f16;"));
                if let Err(e) = validate(&src) {
                    panic!("{spec:?} does not validate:\n{e}");
                }
            }
        }
    }

    /// The SPIR-V a Vulkan device gets (VK_KHR_cooperative_matrix): naga's backend accepts
    /// the module (f16 workgroup arrays, mixed f16 x f16 + f32 multiply-adds). naga's
    /// `spv-out` is enabled by wgpu's Vulkan backend, which these targets build.
    #[cfg(any(target_os = "linux", target_os = "windows"))]
    #[test]
    fn coop_dense_writes_spirv() {
        let spec = CoopSpec::choose(
            CoopShape {
                size: 16,
                subgroup: 32,
            },
            64,
            48 * 1024,
        )
        .unwrap();
        let src = compose_dense_coop(spec);
        let module = naga::front::wgsl::parse_str(&src).unwrap();
        let info = naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::COOPERATIVE_MATRIX
                | naga::valid::Capabilities::SHADER_FLOAT16,
        )
        .validate(&module)
        .unwrap();
        let words = naga::back::spv::write_vec(
            &module,
            &info,
            &naga::back::spv::Options::default(),
            Some(&naga::back::spv::PipelineOptions {
                shader_stage: naga::ShaderStage::Compute,
                entry_point: "main".into(),
            }),
        )
        .unwrap_or_else(|e| panic!("{e:?}"));
        assert!(words.len() > 100);
    }

    /// The f16-storage variant (issue 29): Q, K, V, O bindings f16, loaded and stored through
    /// the conversions, validated with the capabilities a device with cooperative matrices and
    /// SHADER_F16 has, and written to SPIR-V where naga's backend is built; its emulation
    /// validates with SHADER_FLOAT16 alone. The f32 variant is the text it always was.
    #[test]
    fn coop_dense_f16_storage_composes_and_validates() {
        for (size, subgroup) in [(16, 32), (8, 32), (8, 8)] {
            let shape = CoopShape { size, subgroup };
            for head_dim in [1, 8, 33, 64, 128] {
                let spec = CoopSpec::choose(shape, head_dim, 48 * 1024).unwrap();
                assert_eq!(
                    compose_dense_coop_for(spec, Storage::F32),
                    compose_dense_coop(spec)
                );
                let src = compose_dense_coop_for(spec, Storage::F16);
                assert!(src.starts_with("enable f16;\nenable wgpu_cooperative_matrix;"));
                assert_eq!(src.matches("enable f16;").count(), 1);
                for decl in ["q: array<f16>", "k: array<f16>", "v: array<f16>"] {
                    assert!(src.contains(decl), "{decl}");
                }
                assert!(src.contains("out: array<f16>") && src.contains("lse: array<f32>"));
                assert!(src.contains("kx = f32(k[") && src.contains("= f16(os[r * DP + c] * inv)"));
                if let Err(e) = validate(&src) {
                    panic!("{spec:?} f16 does not validate:\n{e}");
                }
                #[cfg(any(target_os = "linux", target_os = "windows"))]
                {
                    let module = naga::front::wgsl::parse_str(&src).unwrap();
                    let info = naga::valid::Validator::new(
                        naga::valid::ValidationFlags::all(),
                        naga::valid::Capabilities::COOPERATIVE_MATRIX
                            | naga::valid::Capabilities::SHADER_FLOAT16,
                    )
                    .validate(&module)
                    .unwrap();
                    naga::back::spv::write_vec(
                        &module,
                        &info,
                        &naga::back::spv::Options::default(),
                        Some(&naga::back::spv::PipelineOptions {
                            shader_stage: naga::ShaderStage::Compute,
                            entry_point: "main".into(),
                        }),
                    )
                    .unwrap_or_else(|e| panic!("{spec:?}: {e:?}"));
                }
                let emulated =
                    compose_dense_coop_emulated_for(emulation_spec(shape, head_dim), Storage::F16);
                for op in ["coopLoad", "coopStore", "coopMultiplyAdd", "coop_mat"] {
                    assert!(!emulated.contains(op), "{op} left");
                }
                let module = naga::front::wgsl::parse_str(&emulated)
                    .unwrap_or_else(|e| panic!("{}", e.emit_to_string(&emulated)));
                naga::valid::Validator::new(
                    naga::valid::ValidationFlags::all(),
                    naga::valid::Capabilities::SHADER_FLOAT16,
                )
                .validate(&module)
                .unwrap_or_else(|e| panic!("{}", e.emit_to_string(&emulated)));
            }
        }
    }

    #[test]
    fn the_emulated_kernel_validates_without_any_capability() {
        for size in [8, 16] {
            let shape = CoopShape { size, subgroup: 8 };
            for d in [1, 16, 40] {
                let src = compose_dense_coop_emulated(emulation_spec(shape, d));
                for op in [
                    "coopLoad",
                    "coopStore",
                    "coopMultiplyAdd",
                    "coop_mat",
                    "f16>",
                ] {
                    assert!(!src.contains(op), "{op} left:\n{src}");
                }
                for call in [
                    "let b = emu_view(false, ",
                    "emu_mad_qs_ks(a, b, s)",
                    "emu_mad_ps_vs(a, b, o)",
                    "emu_load_os(true, ",
                    "emu_store_os(o, ",
                    "emu_store_ss(s, ",
                ] {
                    assert!(src.contains(call), "{call} missing:\n{src}");
                }
                let module = naga::front::wgsl::parse_str(&src)
                    .unwrap_or_else(|e| panic!("{}", e.emit_to_string(&src)));
                naga::valid::Validator::new(
                    naga::valid::ValidationFlags::all(),
                    naga::valid::Capabilities::empty(),
                )
                .validate(&module)
                .unwrap_or_else(|e| panic!("{}", e.emit_to_string(&src)));
            }
        }
    }

    /// Every head dimension the library takes (1 ..= 256) can be emulated with either matrix
    /// size: at least one key tile per dispatch, keys per dispatch a multiple of BK, and the
    /// bound of a dispatch under half of llvmpipe's limit. The report of issue 29 (n = 97,
    /// d = 24, 8 x 8) is more than one dispatch's worth for the old emulation (every lane
    /// computing every product: ~6000 iterations per key tile, 13 tiles > 65535) but one
    /// dispatch now. A head no single key tile of which fits is an error, not a wrong answer.
    #[test]
    fn the_emulation_cuts_keys_under_the_loop_limit() {
        for size in [8, 16] {
            let shape = CoopShape { size, subgroup: 8 };
            for d in 1..=256u32 {
                let spec = emulation_spec(shape, d as usize);
                let keys = emulated_keys_per_dispatch(spec, d).unwrap();
                assert!(
                    keys >= spec.bk && keys.is_multiple_of(spec.bk),
                    "{spec:?}: {keys}"
                );
                let (fixed, per_tile) = emulated_loop_iterations(spec, d);
                let tiles = (keys / spec.bk) as u64;
                assert!(
                    fixed + tiles * per_tile <= LLVMPIPE_LOOP_LIMIT / 2,
                    "{spec:?}"
                );
            }
        }
        let spec = emulation_spec(
            CoopShape {
                size: 8,
                subgroup: 8,
            },
            24,
        );
        assert!(emulated_keys_per_dispatch(spec, 24).unwrap() >= 97);
        let spec = emulation_spec(
            CoopShape {
                size: 16,
                subgroup: 8,
            },
            4096,
        );
        let e = emulated_keys_per_dispatch(spec, 4096)
            .unwrap_err()
            .to_string();
        assert!(e.contains("emulated cooperative-matrix kernel"), "{e}");
        for (size, d) in [(8, 24), (8, 128), (16, 24), (16, 128)] {
            let spec = emulation_spec(CoopShape { size, subgroup: 8 }, d);
            let keys = emulated_keys_per_dispatch(spec, d as u32).unwrap();
            eprintln!("cm {size} d {d}: {keys} keys per dispatch");
        }
    }

    #[test]
    fn coop_dense_needs_the_capabilities() {
        let spec = CoopSpec::choose(
            CoopShape {
                size: 16,
                subgroup: 32,
            },
            64,
            48 * 1024,
        )
        .unwrap();
        let src = compose_dense_coop(spec);
        let module = naga::front::wgsl::parse_str(&src).unwrap();
        let plain = naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::SHADER_FLOAT16,
        )
        .validate(&module);
        assert!(plain.is_err(), "validated without COOPERATIVE_MATRIX");
    }

    #[test]
    fn coop_tiles_fit_workgroup_memory() {
        let shape = CoopShape {
            size: 16,
            subgroup: 32,
        };
        let s = CoopSpec::choose(shape, 64, 48 * 1024).unwrap();
        assert_eq!((s.bq, s.bk, s.dp, s.wg), (64, 32, 64, 32));
        assert!(s.workgroup_bytes() <= 48 * 1024);
        let s = CoopSpec::choose(shape, 128, 48 * 1024).unwrap();
        assert!(s.workgroup_bytes() <= 48 * 1024 && s.bq < 64, "{s:?}");
        // d = 1 pads to one matrix.
        assert_eq!(CoopSpec::choose(shape, 1, 48 * 1024).unwrap().dp, 16);
        let err = CoopSpec::choose(shape, 4096, 48 * 1024).unwrap_err();
        assert!(err.to_string().contains("head_dim"), "{err}");
        assert!(CoopSpec::choose(shape, 0, 48 * 1024).is_err());
    }

    #[test]
    fn fitting_shape_takes_the_largest_f16_f32_square() {
        assert_eq!(fitting_shape(&[]), None);
        assert_eq!(fitting_shape(&[prop(8, F32, F32)]), None);
        assert_eq!(fitting_shape(&[prop(16, F16, F16)]), None);
        assert_eq!(fitting_shape(&[prop(16, I32, I32)]), None);
        assert_eq!(
            fitting_shape(&[prop(8, F16, F32), prop(16, F16, F32)]),
            Some(16)
        );
        assert_eq!(fitting_shape(&[prop(8, F16, F32)]), Some(8));
        let mut rect = prop(16, F16, F32);
        rect.k_size = 8;
        assert_eq!(fitting_shape(&[rect]), None);
    }

    #[test]
    fn shapes_are_described_for_info() {
        assert_eq!(describe_shapes(&[]), "none");
        let mut sat = prop(8, I32, I32);
        sat.saturating_accumulation = true;
        assert_eq!(
            describe_shapes(&[prop(16, F16, F32), prop(8, F32, F32), sat]),
            "16x16x16 f16->f32, 8x8x8 f32->f32, 8x8x8 i32->i32 (saturating)"
        );
    }

    #[test]
    fn an_offer_says_what_it_lacks() {
        let nvidia = CoopOffer {
            feature: true,
            f16: true,
            shapes: vec![prop(16, F16, F16), prop(16, F16, F32)],
            subgroup: (32, 32),
        };
        assert_eq!(
            nvidia.choose(),
            Ok(CoopShape {
                size: 16,
                subgroup: 32
            })
        );
        let lavapipe = CoopOffer {
            feature: false,
            f16: true,
            shapes: vec![],
            subgroup: (8, 8),
        };
        let why = lavapipe.choose().unwrap_err();
        assert!(why.contains("EXPERIMENTAL_COOPERATIVE_MATRIX"), "{why}");
        assert!(why.contains("offers none"), "{why}");
        let varying = CoopOffer {
            subgroup: (32, 64),
            ..nvidia.clone()
        };
        assert!(varying.choose().unwrap_err().contains("32 to 64"));
        let no_f16 = CoopOffer {
            f16: false,
            ..nvidia
        };
        assert!(no_f16.choose().unwrap_err().contains("SHADER_F16"));
        let e = required_error("llvmpipe", why);
        assert!(e.to_string().contains("cooperative_matrix"), "{e}");
    }
}
