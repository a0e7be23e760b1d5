//! The identity of every GPU pass and the constants a pipeline is specialised by: what a plan
//! schedules. Which WGSL file a pass runs and what it binds is the engine's business
//! (`gpu::engine::passes`, one descriptor per pass), so plans stay free of the GPU layer.

/// The passes of the library. Adding one: its WGSL file in `shaders/`, a variant here, its
/// descriptor in `gpu/engine/passes.rs` (the match there is exhaustive, so a pass without one
/// does not compile) and the plan that schedules it.
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

    /// A short name for labels and errors: the stem of the pass's WGSL file.
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
}
