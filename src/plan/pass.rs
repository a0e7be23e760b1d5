//! The identity of every GPU pass and the constants a pipeline is specialised by: what a plan
//! schedules. Which WGSL file a pass runs and what it binds is the engine's business
//! (`gpu::engine::passes`, one descriptor per pass), so plans stay free of the GPU layer.

use crate::storage::Storage;

/// Declares [`Pass`] from one list, so a pass's variant, its name and its place in
/// [`Pass::ALL`] cannot disagree.
macro_rules! passes {
    ($($(#[doc = $doc:expr])+ $variant:ident => $name:literal,)+) => {
        /// The passes of the library. Adding one: its WGSL file in `shaders/`, a line here, its
        /// descriptor in `gpu/engine/passes.rs` (the match there is exhaustive, so a pass
        /// without one does not compile) and the plan that schedules it.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Pass {
            $($(#[doc = $doc])+ $variant,)+
        }

        impl Pass {
            /// Every pass (the validation tests and the device's layouts walk it).
            pub const ALL: [Pass; [$($name),+].len()] = [$(Pass::$variant),+];

            /// A short name for labels and errors: the stem of the pass's WGSL file.
            pub fn name(self) -> &'static str {
                match self {
                    $(Pass::$variant => $name,)+
                }
            }
        }
    };
}

passes! {
    /// Coarse keys and values (and coarse queries) of one level (`shaders/downsample.wgsl`).
    Downsample => "downsample",
    /// One round of the tree that adds the Learned downsample pass's tap-chunk partial sums
    /// (`shaders/downsample_combine.wgsl`).
    DownsampleCombine => "downsample_combine",
    /// The fused fine-query FMA pass, or the near field alone with coarse queries
    /// (`shaders/fine_attention.wgsl`).
    FineAttention => "fine_attention",
    /// The fused fine-query FMA pass in FlashAttention-2's shape for GPUs: a workgroup per
    /// tile of a fine block's queries, register micro-tiles of rows x keys
    /// (`shaders/fine_attention_tiled.wgsl`).
    FineTiled => "fine_attention_tiled",
    /// Exact dense attention (`shaders/dense_attention.wgsl`).
    DenseAttention => "dense_attention",
    /// Exact dense attention in FlashAttention-2's shape for GPUs: a workgroup per block of
    /// query rows, register micro-tiles of rows x keys (`shaders/dense_tiled.wgsl`).
    DenseTiled => "dense_tiled",
    /// Dense backward: dK, dV per key tile over its group's queries
    /// (`shaders/dense_backward_dkv.wgsl`).
    DenseBackwardDkv => "dense_backward_dkv",
    /// Dense backward: dQ per query tile over its keys (`shaders/dense_backward_dq.wgsl`).
    DenseBackwardDq => "dense_backward_dq",
    /// Backward: D = rowsum(dO * O) next to the LSE (`shaders/backward_delta.wgsl`).
    BackwardDelta => "backward_delta",
    /// Backward: dQ of fine queries (`shaders/backward_dq.wgsl`).
    BackwardDq => "backward_dq",
    /// Backward: dK, dV of the near field (`shaders/backward_dkv_fine.wgsl`).
    BackwardDkvFine => "backward_dkv_fine",
    /// Backward: dK~, dV~ of one level's coarse keys (`shaders/backward_dkv_coarse.wgsl`).
    BackwardDkvCoarse => "backward_dkv_coarse",
    /// Backward: one round of the tree that adds the coarse dK~/dV~ pass's reader-chunk
    /// partial sums (`shaders/backward_dkv_combine.wgsl`).
    BackwardDkvCombine => "backward_dkv_combine",
    /// Backward of coarse queries: what each coarse-query row's tokens send back to it, its
    /// (G, R, H), one level (`shaders/backward_coarse_stats.wgsl`).
    BackwardCoarseStats => "backward_coarse_stats",
    /// Backward of coarse queries: dQ~ of one level's coarse queries
    /// (`shaders/backward_coarse_dq.wgsl`).
    BackwardCoarseDq => "backward_coarse_dq",
    /// Backward of coarse queries: dK~, dV~ of one level's coarse keys gathered over the
    /// coarse-query rows that saw them (`shaders/backward_dkv_coarse.wgsl`, bound to Q~ and
    /// the rows' (G, R, H)).
    BackwardDkvCoarseQ => "backward_dkv_coarse_q",
    /// Backward of coarse queries: gradients of one level's learned query weights
    /// (`shaders/weights_backward_q.wgsl`).
    WeightsBackwardQ => "weights_backward_q",
    /// Backward of coarse queries: one round of the tree that adds `weights_backward_q`'s
    /// partial sums over chunks of a level's windows (`shaders/weights_backward_q_combine.wgsl`).
    WeightsBackwardQCombine => "weights_backward_q_combine",
    /// Backward: coarse gradients back through the downsampling
    /// (`shaders/downsample_backward.wgsl`).
    DownsampleBackward => "downsample_backward",
    /// Backward: gradients of one level's learned weights (`shaders/weights_backward.wgsl`).
    WeightsBackward => "weights_backward",
    /// Backward: one round of the tree that adds `weights_backward`'s partial sums over chunks
    /// of a level's windows (`shaders/weights_backward_combine.wgsl`).
    WeightsBackwardCombine => "weights_backward_combine",
    /// Coarse queries' attention to their far list at one level (`shaders/coarse_attention.wgsl`).
    CoarseAttention => "coarse_attention",
    /// Upsampling of every level's coarse-query results and the log-sum-exp merge into the near
    /// field (`shaders/upsample_merge.wgsl`).
    UpsampleMerge => "upsample_merge",
    /// A padded variable-length batch: O = 0 and LSE = -inf on the padding rows
    /// (`shaders/pad_rows.wgsl`).
    PadRows => "pad_rows",
    /// A padded variable-length batch's backward: dQ, dK, dV = 0 on the padding rows
    /// (`shaders/pad_gradients.wgsl`).
    PadGradients => "pad_gradients",
    /// Decoding: a record's cache upkeep, the step's keys and values into the near-field ring,
    /// every level's coarse keys and values as their windows fill, the lengths advanced
    /// (`shaders/decode_ingest.wgsl`).
    DecodeIngest => "decode_ingest",
    /// Decoding: a whole FMA step, the queries' attention and the cache upkeep in one pass
    /// (`shaders/decode_step.wgsl`; Average pooling, chunks of at most m + 1 tokens).
    DecodeStep => "decode_step",
    /// Decoding: a step's queries against the near ring and the coarse slots, after
    /// `decode_ingest` (`shaders/decode_attention.wgsl`).
    DecodeAttention => "decode_attention",
    /// Exact dense decoding: partial softmax of one segment of a history page
    /// (`shaders/decode_dense.wgsl`).
    DecodeDense => "decode_dense",
    /// Exact dense decoding: the segments' partials merged into O and the LSE
    /// (`shaders/decode_merge.wgsl`).
    DecodeMerge => "decode_merge",
}

/// Specialisation constants of one pipeline, prepended to the pass's WGSL as `const`s: fixed
/// sizes let private and workgroup arrays be sized exactly; a pipeline is built once per
/// distinct (pass, specialisation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Specialization {
    /// Invocations per workgroup (one query row each in the attention passes).
    pub wg: u32,
    /// Keys per tile staged in workgroup memory (attention passes; ignored by downsample).
    pub bk: u32,
    /// Head dimension rounded up to vec4s: ceil(d / 4) (attention passes).
    pub d4: u32,
    /// The geometry the pass is composed with: false the 1D line (`shared/geometry.wgsl`),
    /// true the 2D grid of algorithm.md §9 (`shared/geometry_grid.wgsl`).
    pub grid: bool,
    /// The softmax variants the pass is composed with (issue 30): each on is a WGSL `const`
    /// true, so a pipeline without them is the plain one, compiled as before.
    pub softmax: SoftmaxFlags,
    /// The element type of the pass's Q, K, V, O (and gradient) bindings (issue 29,
    /// `gpu/engine/storage_types.rs`): [`Storage::F32`] composes the text it always did.
    pub storage: Storage,
}

/// Which softmax variants of issue 30 ([`crate::Variants`]) a pipeline is specialised for
/// (`shared/variants.wgsl`: WGSL consts `SOFTCAP`, `SINKS`, `WINDOW`). The values (C, the
/// sinks, the window) are in the parameter block; only their presence changes the code.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SoftmaxFlags {
    /// Logits capped: C tanh(l / C).
    pub softcap: bool,
    /// A sink term per query head in every row's denominator.
    pub sinks: bool,
    /// A sliding window masks keys outside i - L <= t <= i + R.
    pub window: bool,
}

impl SoftmaxFlags {
    /// The plain softmax.
    pub const PLAIN: Self = Self {
        softcap: false,
        sinks: false,
        window: false,
    };

    /// The flags of `variants`.
    pub fn of(variants: &crate::variants::Variants) -> Self {
        Self {
            softcap: variants.softcap.is_some(),
            sinks: variants.sinks.is_some(),
            window: variants.window.is_some(),
        }
    }
}
