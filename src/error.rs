//! The one error type of the library: every way a caller can go wrong, named.

use thiserror::Error;

/// Everything that can go wrong in `multipole-attn`. Each variant says what was wrong and,
/// where there is one, what is allowed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum FmaError {
    /// A tensor's length or shape disagrees with the declared (batch, heads, seq, head_dim).
    #[error("shape mismatch for {what}: expected {expected}, got {got}")]
    ShapeMismatch {
        /// Which tensor or argument.
        what: String,
        /// What the shape said it must be.
        expected: String,
        /// What was passed.
        got: String,
    },
    /// A configuration value is outside what the algorithm or the kernels allow.
    #[error("invalid {what} = {value}: {allowed}")]
    InvalidConfig {
        /// The parameter's name.
        what: &'static str,
        /// The value passed.
        value: String,
        /// What is allowed.
        allowed: String,
    },
    /// Coarse queries were asked for together with the causal mask (algorithm.md §6): a pooled
    /// query mixes every token of its sub-window, so a token's output would depend on later
    /// tokens. Causal attention uses fine queries.
    #[error(
        "coarse queries are bidirectional only: a pooled query mixes every token of its \
         sub-window, so with the causal mask a token's output would depend on later tokens; \
         use fine queries for causal attention (or drop the causal mask)"
    )]
    CausalCoarseQueries,
    /// The causal mask was asked for on a 2D grid (algorithm.md §9): a grid has no order in
    /// which later tokens are hidden; 2D FMA is bidirectional.
    #[error(
        "the causal mask is not defined on a 2D grid (algorithm.md §9): 2D FMA is \
         bidirectional; drop the causal mask or lay the tokens on a line"
    )]
    CausalGrid,
    /// Learned downsampling weights of the wrong shape, or missing a level.
    #[error("learned weights: {0}")]
    Weights(String),
    /// The request needs more of an adapter resource than the adapter grants. The message
    /// says what was asked, what is allowed and what to do instead.
    #[error("{what}: {requested} {unit} needed, at most {max} allowed by the adapter; {advice}")]
    LimitExceeded {
        /// What needs the resource (the coarse keys of one head, a dispatch, ...).
        what: String,
        /// How much the request needs, in `unit`.
        requested: u64,
        /// The adapter's limit, in `unit`.
        max: u64,
        /// The resource's unit: "bytes in one storage binding", "workgroups", ...
        unit: &'static str,
        /// What the caller can change so that the request fits.
        advice: String,
    },
    /// No GPU adapter could be found (or none on the backend asked for by `WGPU_BACKEND`).
    #[error("no GPU adapter found{0}")]
    NoAdapter(String),
    /// The adapter refused to create a device with the requested limits or features.
    #[error("could not create a device on adapter {adapter}: {reason}")]
    RequestDevice {
        /// The adapter's name.
        adapter: String,
        /// What wgpu said.
        reason: String,
    },
    /// wgpu reported a validation or out-of-memory error while building or running a pass.
    #[error("GPU error in {stage}: {message}")]
    Gpu {
        /// What the library was doing.
        stage: String,
        /// What wgpu said.
        message: String,
    },
    /// The GPU ran out of memory while allocating or running a pass. Nothing was written to
    /// the caller's outputs that can be trusted; a smaller batch or sequence may fit.
    #[error(
        "GPU out of memory in {stage}: {message}; process fewer heads or a shorter sequence per \
         call"
    )]
    OutOfMemory {
        /// What the library was doing.
        stage: String,
        /// What wgpu said.
        message: String,
    },
    /// The device was lost (driver reset, out of memory, adapter removed).
    #[error("GPU device lost: {0}")]
    DeviceLost(String),
    /// A backward pass was asked for without the forward it differentiates: no saved LSE, or
    /// tensors saved by another [`crate::gpu::Attention`] (another method or configuration).
    #[error("the backward needs the tensors saved by this FmaAttention's forward: {0}")]
    NoSavedForward(String),
    /// The request needs a device feature the adapter does not offer (f16 storage without
    /// `SHADER_F16`, every browser without shader-f16 among them).
    #[error("{what} needs the device feature {feature}, which adapter {adapter} does not offer; {advice}")]
    MissingFeature {
        /// What needed it.
        what: String,
        /// The wgpu feature, as wgpu names it.
        feature: &'static str,
        /// The adapter's name.
        adapter: String,
        /// What the caller can do instead.
        advice: String,
    },
    /// Reading results back from the GPU failed.
    #[error("reading results back from the GPU failed: {0}")]
    Readback(String),
}

/// Shorthand for `Result<T, FmaError>`.
pub type Result<T> = std::result::Result<T, FmaError>;
