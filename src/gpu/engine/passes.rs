//! One descriptor per pass: its WGSL source and its bindings, in binding order, each with the
//! role of the buffer it holds and its access. Bind-group layouts, pipeline layouts and bind
//! groups are all derived from these (`pipelines.rs`, `record.rs`), and a test (in
//! `shaders.rs`, which composes the WGSL) reflects every pass with naga and compares it with its
//! descriptor, name by name. The match in
//! [`desc`] is exhaustive: a [`Pass`] without a descriptor does not compile.

use crate::plan::Pass;

/// How a pass uses one binding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// The uniform parameter block.
    Uniform,
    /// A storage buffer the pass only reads.
    Read,
    /// A storage buffer the pass writes (and may read).
    ReadWrite,
}

/// What a binding holds. An executor supplies one buffer per role it uses
/// (`Resources` in `gpu/engine/record.rs`); the descriptor says where each goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// The uniform `Params` block (`shaders/shared/params.wgsl`).
    Params,
    /// Queries Q, (bh, n, d).
    Q,
    /// Keys K, (bh, n_k, d).
    K,
    /// Values V, (bh, n_k, d).
    V,
    /// Output O, (bh, n, d).
    Out,
    /// Per-row log-sum-exp, (bh, n).
    Lse,
    /// The dense forward's partial O between key chunks, f32 under f16 storage (O's rows,
    /// (bh, n, d) as O's binding holds them): bound by the f16 variant only
    /// ([`f16_only_bindings`]).
    OutPartial,
    /// The dense backward's partial dQ between key parts, f32 under f16 storage (dQ's rows,
    /// (bh, n, d)): bound by the f16 variant only ([`f16_only_bindings`]).
    DQPartial,
    /// The dense backward's partial dK between query parts, f32 under f16 storage (dK's rows,
    /// (bh / kv_group, n_kv, d)): bound by the f16 variant only.
    DKPartial,
    /// The dense backward's partial dV between query parts, as [`Role::DKPartial`].
    DVPartial,
    /// Coarse keys of every level, (bh, coarse_rows, d).
    CoarseK,
    /// Coarse values of every level, (bh, coarse_rows, d).
    CoarseV,
    /// Coarse queries of every level, (bh, coarse_rows, d).
    CoarseQ,
    /// The coarse queries' partial outputs o~, (bh, coarse_rows, d).
    CoarseOut,
    /// The coarse queries' partial LSEs, (bh, coarse_rows).
    CoarseLse,
    /// Learned weights, [keys | values | queries] of every level.
    Weights,
    /// Learned biases, [keys | values | queries] of every level.
    Biases,
    /// dL/dO, (bh, n, d).
    DOut,
    /// LSE and D = rowsum(dO * O) per row, (bh, n, 2).
    Stats,
    /// dL/dQ, (bh, n, d).
    DQ,
    /// dL/dK, (bh, n, d).
    DK,
    /// dL/dV, (bh, n, d).
    DV,
    /// dL/dK~, (bh, coarse_rows, d).
    DCoarseK,
    /// dL/dV~, (bh, coarse_rows, d).
    DCoarseV,
    /// dL/dWK of every level.
    DWk,
    /// dL/dWV of every level.
    DWv,
    /// dL/dbK of every level.
    DBk,
    /// dL/dbV of every level.
    DBv,
    /// Coarse queries: dL/dQ~, (bh, coarse_rows, d).
    DCoarseQ,
    /// Coarse queries: G, what a coarse-query row's tokens send back, (bh, coarse_rows, d).
    CoarseDOut,
    /// Coarse queries: (R, H) per coarse-query row, (bh, coarse_rows, 2).
    CoarseStats,
    /// Coarse queries: dL/dWQ of every level.
    DWq,
    /// Coarse queries: dL/dbQ of every level.
    DBq,
    /// Decoding: tokens so far per sequence, (batch) u32.
    Lens,
    /// Decoding: the near-field ring of a group's heads, (rows, 2, R, d).
    Ring,
    /// Decoding: the coarse slots of a group's heads, (rows, 2, levels, slots, p, d).
    CoarseSlots,
    /// Dense decoding: per-segment partial softmaxes, (rows, chunk, segments, d + 2).
    Partials,
    /// Dense decoding: one history page of keys, (rows, T, d).
    PageK,
    /// Dense decoding: one history page of values, (rows, T, d).
    PageV,
    /// The sequence table of a variable-length batch (`shaders/shared/sequences.wgsl`,
    /// `plan::SeqTable`); a placeholder for a batch of equal sequences.
    SeqTable,
}

/// One binding of group 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Binding {
    /// Binding number, as `@binding(n)` in the WGSL.
    pub binding: u32,
    /// The WGSL variable's name (the test checks it, so a swapped pair of bindings shows).
    pub name: &'static str,
    /// What it holds.
    pub role: Role,
    /// How the pass uses it.
    pub access: Access,
}

/// What the engine needs to know about a pass besides its identity.
#[derive(Debug)]
pub struct PassDesc {
    /// The pass's own WGSL file, before imports and specialisation.
    pub source: &'static str,
    /// Group 0, in binding order.
    pub bindings: &'static [Binding],
    /// Whether group 1 holds the per-dispatch `LevelSelect` at a dynamic offset
    /// (`shaders/shared/level_select.wgsl`): the passes dispatched once per level or several
    /// times per plan.
    pub level_select: bool,
}

const fn bind(binding: u32, name: &'static str, role: Role, access: Access) -> Binding {
    Binding {
        binding,
        name,
        role,
        access,
    }
}

use Access::{Read, ReadWrite, Uniform};
use Role::*;

const PARAMS: Binding = bind(0, "params", Params, Uniform);
const SEQ_TABLE: Binding = bind(10, "seq_table", SeqTable, Read);
/// The dense forward's f32 partial O under f16 storage (`storage_types::to_f16_storage`).
const OUT_PARTIAL: Binding = bind(8, "out_partial", OutPartial, ReadWrite);
/// The dense backward's f32 partial gradients under f16 storage.
const DQ_PARTIAL: Binding = bind(8, "dq_partial", DQPartial, ReadWrite);
const DK_PARTIAL: Binding = bind(8, "dk_partial", DKPartial, ReadWrite);
const DV_PARTIAL: Binding = bind(9, "dv_partial", DVPartial, ReadWrite);

/// The bindings that only `pass`'s f16-storage variant declares (issue 29), beside its
/// descriptor's: the dense forward passes keep a row's partial O in f32 between key chunks
/// (`Role::OutPartial`), so that O is rounded to f16 once, by the last chunk. The f32 variant
/// resumes from O itself and composes the text it always did. The dense backward's passes
/// keep their partial gradients in f32 between parts the same way (`Role::DQPartial`, and
/// `Role::DKPartial`, `Role::DVPartial`): dQ, dK, dV are rounded once, by their last part.
pub fn f16_only_bindings(pass: Pass) -> &'static [Binding] {
    match pass {
        Pass::DenseAttention | Pass::DenseTiled => &[OUT_PARTIAL],
        Pass::DenseBackwardDq => &[DQ_PARTIAL],
        Pass::DenseBackwardDkv => &[DK_PARTIAL, DV_PARTIAL],
        _ => &[],
    }
}

/// Group 0 of `pass`'s variant for `storage`, in binding order: its descriptor's bindings,
/// and under f16 [`f16_only_bindings`].
pub fn bindings_for(pass: Pass, storage: crate::Storage) -> Vec<Binding> {
    let mut all = desc(pass).bindings.to_vec();
    if storage == crate::Storage::F16 {
        all.extend_from_slice(f16_only_bindings(pass));
        all.sort_by_key(|b| b.binding);
    }
    all
}

/// The descriptor of `pass`.
pub fn desc(pass: Pass) -> &'static PassDesc {
    match pass {
        Pass::Downsample => &DOWNSAMPLE,
        Pass::DownsampleCombine => &DOWNSAMPLE_COMBINE,
        Pass::FineAttention => &FINE_ATTENTION,
        Pass::FineTiled => &FINE_TILED,
        Pass::DenseAttention => &DENSE_ATTENTION,
        Pass::DenseTiled => &DENSE_TILED,
        Pass::DenseBackwardDkv => &DENSE_BACKWARD_DKV,
        Pass::DenseBackwardDq => &DENSE_BACKWARD_DQ,
        Pass::CoarseAttention => &COARSE_ATTENTION,
        Pass::UpsampleMerge => &UPSAMPLE_MERGE,
        Pass::PadRows => &PAD_ROWS,
        Pass::PadGradients => &PAD_GRADIENTS,
        Pass::BackwardDelta => &BACKWARD_DELTA,
        Pass::BackwardDq => &BACKWARD_DQ,
        Pass::BackwardDkvFine => &BACKWARD_DKV_FINE,
        Pass::BackwardDkvCoarse => &BACKWARD_DKV_COARSE,
        Pass::BackwardDkvCombine => &BACKWARD_DKV_COMBINE,
        Pass::BackwardCoarseStats => &BACKWARD_COARSE_STATS,
        Pass::BackwardCoarseDq => &BACKWARD_COARSE_DQ,
        Pass::BackwardDkvCoarseQ => &BACKWARD_DKV_COARSE_Q,
        Pass::WeightsBackwardQ => &WEIGHTS_BACKWARD_Q,
        Pass::WeightsBackwardQCombine => &WEIGHTS_BACKWARD_Q_COMBINE,
        Pass::DownsampleBackward => &DOWNSAMPLE_BACKWARD,
        Pass::WeightsBackward => &WEIGHTS_BACKWARD,
        Pass::WeightsBackwardCombine => &WEIGHTS_BACKWARD_COMBINE,
        Pass::DecodeIngest => &DECODE_INGEST,
        Pass::DecodeStep => &DECODE_STEP,
        Pass::DecodeAttention => &DECODE_ATTENTION,
        Pass::DecodeDense => &DECODE_DENSE,
        Pass::DecodeMerge => &DECODE_MERGE,
    }
}

static DOWNSAMPLE: PassDesc = PassDesc {
    source: include_str!("../../../shaders/downsample.wgsl"),
    bindings: &[
        PARAMS,
        bind(1, "k", K, Read),
        bind(2, "v", V, Read),
        bind(3, "q", Q, Read),
        bind(4, "w", Weights, Read),
        bind(6, "coarse_k", CoarseK, ReadWrite),
        bind(7, "coarse_v", CoarseV, ReadWrite),
        bind(8, "coarse_q", CoarseQ, ReadWrite),
        SEQ_TABLE,
    ],
    level_select: true,
};

static DOWNSAMPLE_COMBINE: PassDesc = PassDesc {
    source: include_str!("../../../shaders/downsample_combine.wgsl"),
    bindings: &[
        PARAMS,
        bind(6, "coarse_k", CoarseK, ReadWrite),
        bind(7, "coarse_v", CoarseV, ReadWrite),
        bind(8, "coarse_q", CoarseQ, ReadWrite),
        SEQ_TABLE,
    ],
    level_select: true,
};

static FINE_ATTENTION: PassDesc = PassDesc {
    source: include_str!("../../../shaders/fine_attention.wgsl"),
    bindings: &[
        PARAMS,
        bind(1, "q", Q, Read),
        bind(2, "k", K, Read),
        bind(3, "v", V, Read),
        bind(4, "coarse_k", CoarseK, Read),
        bind(5, "coarse_v", CoarseV, Read),
        bind(6, "out", Out, ReadWrite),
        bind(7, "lse", Lse, ReadWrite),
        SEQ_TABLE,
    ],
    level_select: false,
};

static FINE_TILED: PassDesc = PassDesc {
    source: include_str!("../../../shaders/fine_attention_tiled.wgsl"),
    bindings: FINE_ATTENTION.bindings,
    level_select: false,
};

static DENSE_ATTENTION: PassDesc = PassDesc {
    source: include_str!("../../../shaders/dense_attention.wgsl"),
    bindings: &[
        PARAMS,
        bind(1, "q", Q, Read),
        bind(2, "k", K, Read),
        bind(3, "v", V, Read),
        bind(6, "out", Out, ReadWrite),
        bind(7, "lse", Lse, ReadWrite),
        SEQ_TABLE,
    ],
    level_select: false,
};

/// The tiled dense forward binds what the rows kernel binds: either runs a dense plan's
/// attention dispatch with the same resources.
static DENSE_TILED: PassDesc = PassDesc {
    source: include_str!("../../../shaders/dense_tiled.wgsl"),
    bindings: DENSE_ATTENTION.bindings,
    level_select: false,
};

static DENSE_BACKWARD_DKV: PassDesc = PassDesc {
    source: include_str!("../../../shaders/dense_backward_dkv.wgsl"),
    bindings: &[
        PARAMS,
        bind(1, "q", Q, Read),
        bind(2, "k", K, Read),
        bind(3, "v", V, Read),
        bind(4, "dout", DOut, Read),
        bind(5, "stats", Stats, Read),
        bind(6, "dk", DK, ReadWrite),
        bind(7, "dv", DV, ReadWrite),
        SEQ_TABLE,
    ],
    level_select: false,
};

static DENSE_BACKWARD_DQ: PassDesc = PassDesc {
    source: include_str!("../../../shaders/dense_backward_dq.wgsl"),
    bindings: &[
        PARAMS,
        bind(1, "q", Q, Read),
        bind(2, "k", K, Read),
        bind(3, "v", V, Read),
        bind(4, "dout", DOut, Read),
        bind(5, "stats", Stats, Read),
        bind(6, "dq", DQ, ReadWrite),
        SEQ_TABLE,
    ],
    level_select: false,
};

static COARSE_ATTENTION: PassDesc = PassDesc {
    source: include_str!("../../../shaders/coarse_attention.wgsl"),
    bindings: &[
        PARAMS,
        bind(1, "q", CoarseQ, Read),
        bind(4, "coarse_k", CoarseK, Read),
        bind(5, "coarse_v", CoarseV, Read),
        bind(6, "out", CoarseOut, ReadWrite),
        bind(7, "lse", CoarseLse, ReadWrite),
        SEQ_TABLE,
    ],
    level_select: true,
};

static UPSAMPLE_MERGE: PassDesc = PassDesc {
    source: include_str!("../../../shaders/upsample_merge.wgsl"),
    bindings: &[
        PARAMS,
        bind(1, "coarse_o", CoarseOut, Read),
        bind(2, "coarse_lse", CoarseLse, Read),
        bind(6, "out", Out, ReadWrite),
        bind(7, "lse", Lse, ReadWrite),
        SEQ_TABLE,
    ],
    level_select: true,
};

static PAD_ROWS: PassDesc = PassDesc {
    source: include_str!("../../../shaders/pad_rows.wgsl"),
    bindings: &[
        PARAMS,
        bind(6, "out", Out, ReadWrite),
        bind(7, "lse", Lse, ReadWrite),
        SEQ_TABLE,
    ],
    level_select: true,
};

static PAD_GRADIENTS: PassDesc = PassDesc {
    source: include_str!("../../../shaders/pad_gradients.wgsl"),
    bindings: &[
        PARAMS,
        bind(1, "dq", DQ, ReadWrite),
        bind(2, "dk", DK, ReadWrite),
        bind(3, "dv", DV, ReadWrite),
        SEQ_TABLE,
    ],
    level_select: true,
};

static BACKWARD_DELTA: PassDesc = PassDesc {
    source: include_str!("../../../shaders/backward_delta.wgsl"),
    bindings: &[
        PARAMS,
        bind(1, "o", Out, Read),
        bind(2, "dout", DOut, Read),
        bind(3, "lse", Lse, Read),
        bind(4, "stats", Stats, ReadWrite),
        SEQ_TABLE,
    ],
    level_select: true,
};

static BACKWARD_DQ: PassDesc = PassDesc {
    source: include_str!("../../../shaders/backward_dq.wgsl"),
    bindings: &[
        PARAMS,
        bind(1, "q", Q, Read),
        bind(2, "k", K, Read),
        bind(3, "v", V, Read),
        bind(4, "coarse_k", CoarseK, Read),
        bind(5, "coarse_v", CoarseV, Read),
        bind(6, "dout", DOut, Read),
        bind(7, "stats", Stats, Read),
        bind(8, "dq", DQ, ReadWrite),
    ],
    level_select: true,
};

static BACKWARD_DKV_FINE: PassDesc = PassDesc {
    source: include_str!("../../../shaders/backward_dkv_fine.wgsl"),
    bindings: &[
        PARAMS,
        bind(1, "q", Q, Read),
        bind(2, "k", K, Read),
        bind(3, "v", V, Read),
        bind(4, "dout", DOut, Read),
        bind(5, "stats", Stats, Read),
        bind(6, "dk", DK, ReadWrite),
        bind(7, "dv", DV, ReadWrite),
        SEQ_TABLE,
    ],
    level_select: true,
};

static BACKWARD_DKV_COARSE: PassDesc = PassDesc {
    source: include_str!("../../../shaders/backward_dkv_coarse.wgsl"),
    bindings: &[
        PARAMS,
        bind(1, "q", Q, Read),
        bind(2, "coarse_k", CoarseK, Read),
        bind(3, "coarse_v", CoarseV, Read),
        bind(4, "dout", DOut, Read),
        bind(5, "stats", Stats, Read),
        bind(6, "dcoarse_k", DCoarseK, ReadWrite),
        bind(7, "dcoarse_v", DCoarseV, ReadWrite),
        SEQ_TABLE,
    ],
    level_select: true,
};

static BACKWARD_DKV_COMBINE: PassDesc = PassDesc {
    source: include_str!("../../../shaders/backward_dkv_combine.wgsl"),
    bindings: &[
        PARAMS,
        bind(1, "dcoarse_k", DCoarseK, ReadWrite),
        bind(2, "dcoarse_v", DCoarseV, ReadWrite),
        SEQ_TABLE,
    ],
    level_select: true,
};

/// The coarse-query twin of [`BACKWARD_DKV_COARSE`]: the same WGSL (which branches on
/// `params.coarse_queries`), its queries the coarse-query rows.
static BACKWARD_DKV_COARSE_Q: PassDesc = PassDesc {
    source: include_str!("../../../shaders/backward_dkv_coarse.wgsl"),
    bindings: &[
        PARAMS,
        bind(1, "q", CoarseQ, Read),
        bind(2, "coarse_k", CoarseK, Read),
        bind(3, "coarse_v", CoarseV, Read),
        bind(4, "dout", CoarseDOut, Read),
        bind(5, "stats", CoarseStats, Read),
        bind(6, "dcoarse_k", DCoarseK, ReadWrite),
        bind(7, "dcoarse_v", DCoarseV, ReadWrite),
        SEQ_TABLE,
    ],
    level_select: true,
};

static BACKWARD_COARSE_STATS: PassDesc = PassDesc {
    source: include_str!("../../../shaders/backward_coarse_stats.wgsl"),
    bindings: &[
        PARAMS,
        bind(1, "dout", DOut, Read),
        bind(2, "stats", Stats, Read),
        bind(3, "coarse_dout", CoarseDOut, ReadWrite),
        bind(4, "coarse_stats", CoarseStats, ReadWrite),
        SEQ_TABLE,
    ],
    level_select: true,
};

static BACKWARD_COARSE_DQ: PassDesc = PassDesc {
    source: include_str!("../../../shaders/backward_coarse_dq.wgsl"),
    bindings: &[
        PARAMS,
        bind(1, "coarse_q", CoarseQ, Read),
        bind(2, "coarse_k", CoarseK, Read),
        bind(3, "coarse_v", CoarseV, Read),
        bind(4, "coarse_dout", CoarseDOut, Read),
        bind(5, "coarse_stats", CoarseStats, Read),
        bind(6, "dcoarse_q", DCoarseQ, ReadWrite),
        SEQ_TABLE,
    ],
    level_select: true,
};

static WEIGHTS_BACKWARD_Q: PassDesc = PassDesc {
    source: include_str!("../../../shaders/weights_backward_q.wgsl"),
    bindings: &[
        PARAMS,
        bind(1, "q", Q, Read),
        bind(2, "dcoarse_q", DCoarseQ, ReadWrite),
        bind(3, "dwq", DWq, ReadWrite),
        bind(4, "dbq", DBq, ReadWrite),
        SEQ_TABLE,
    ],
    level_select: true,
};

static DOWNSAMPLE_BACKWARD: PassDesc = PassDesc {
    source: include_str!("../../../shaders/downsample_backward.wgsl"),
    bindings: &[
        PARAMS,
        bind(1, "w_all", Weights, Read),
        bind(2, "dcoarse_k", DCoarseK, Read),
        bind(3, "dcoarse_v", DCoarseV, Read),
        bind(4, "dk", DK, ReadWrite),
        bind(5, "dv", DV, ReadWrite),
        bind(6, "dcoarse_q", DCoarseQ, Read),
        bind(7, "dq", DQ, ReadWrite),
        SEQ_TABLE,
    ],
    level_select: true,
};

static WEIGHTS_BACKWARD: PassDesc = PassDesc {
    source: include_str!("../../../shaders/weights_backward.wgsl"),
    bindings: &[
        PARAMS,
        bind(1, "k", K, Read),
        bind(2, "v", V, Read),
        bind(3, "dcoarse_k", DCoarseK, Read),
        bind(4, "dcoarse_v", DCoarseV, ReadWrite),
        bind(5, "dwk", DWk, ReadWrite),
        bind(6, "dwv", DWv, ReadWrite),
        bind(7, "dbk", DBk, ReadWrite),
        bind(8, "dbv", DBv, ReadWrite),
    ],
    level_select: true,
};

static WEIGHTS_BACKWARD_Q_COMBINE: PassDesc = PassDesc {
    source: include_str!("../../../shaders/weights_backward_q_combine.wgsl"),
    bindings: &[
        PARAMS,
        bind(1, "dcoarse_q", DCoarseQ, ReadWrite),
        bind(2, "dwq", DWq, ReadWrite),
        bind(3, "dbq", DBq, ReadWrite),
    ],
    level_select: true,
};

static WEIGHTS_BACKWARD_COMBINE: PassDesc = PassDesc {
    source: include_str!("../../../shaders/weights_backward_combine.wgsl"),
    bindings: &[
        PARAMS,
        bind(1, "dcoarse_v", DCoarseV, ReadWrite),
        bind(2, "dwk", DWk, ReadWrite),
        bind(3, "dwv", DWv, ReadWrite),
        bind(4, "dbk", DBk, ReadWrite),
        bind(5, "dbv", DBv, ReadWrite),
    ],
    level_select: true,
};

static DECODE_INGEST: PassDesc = PassDesc {
    source: include_str!("../../../shaders/decode_ingest.wgsl"),
    bindings: &[
        PARAMS,
        bind(1, "k", K, Read),
        bind(2, "v", V, Read),
        bind(3, "lens", Lens, ReadWrite),
        bind(4, "ring", Ring, ReadWrite),
        bind(5, "coarse", CoarseSlots, ReadWrite),
        bind(6, "weights", Weights, Read),
        bind(7, "biases", Biases, Read),
    ],
    level_select: true,
};

static DECODE_STEP: PassDesc = PassDesc {
    source: include_str!("../../../shaders/decode_step.wgsl"),
    bindings: &[
        PARAMS,
        bind(1, "q", Q, Read),
        bind(2, "k", K, Read),
        bind(3, "v", V, Read),
        bind(4, "lens", Lens, ReadWrite),
        bind(5, "ring", Ring, ReadWrite),
        bind(6, "coarse", CoarseSlots, ReadWrite),
        bind(7, "out", Out, ReadWrite),
        bind(8, "lse", Lse, ReadWrite),
    ],
    level_select: true,
};

static DECODE_ATTENTION: PassDesc = PassDesc {
    source: include_str!("../../../shaders/decode_attention.wgsl"),
    bindings: &[
        PARAMS,
        bind(1, "q", Q, Read),
        bind(2, "lens", Lens, Read),
        bind(3, "ring", Ring, Read),
        bind(4, "coarse", CoarseSlots, Read),
        bind(5, "out", Out, ReadWrite),
        bind(6, "lse", Lse, ReadWrite),
    ],
    level_select: true,
};

static DECODE_DENSE: PassDesc = PassDesc {
    source: include_str!("../../../shaders/decode_dense.wgsl"),
    bindings: &[
        PARAMS,
        bind(1, "q", Q, Read),
        bind(2, "lens", Lens, Read),
        bind(3, "page_k", PageK, Read),
        bind(4, "page_v", PageV, Read),
        bind(5, "partials", Partials, ReadWrite),
    ],
    level_select: true,
};

static DECODE_MERGE: PassDesc = PassDesc {
    source: include_str!("../../../shaders/decode_merge.wgsl"),
    bindings: &[
        PARAMS,
        bind(1, "lens", Lens, Read),
        bind(2, "partials", Partials, Read),
        bind(3, "out", Out, ReadWrite),
        bind(4, "lse", Lse, ReadWrite),
    ],
    level_select: true,
};
