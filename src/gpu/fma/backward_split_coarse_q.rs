//! The uniforms of a split head's coarse-query passes ([`CoarseQuerySteps`]; its module header
//! says what runs where): each chunk's level-1 stats with the chunk's parameters (its tokens
//! from its bound rows), and the head's passes over coarse rows alone with the whole head's
//! (`0, 0..n`, as an unsplit run of one head). `backward_split.rs` makes the parameter blocks
//! and records the steps between the chunks' near field and their downsampling backward.

use crate::error::Result;
use crate::gpu::engine::context::GpuContext;
use crate::gpu::engine::params::Params;
use crate::plan::CoarseQuerySteps;

use super::workspace::Uniforms;

/// The uniforms of [`CoarseQuerySteps`]: the parameter blocks and the steps' selectors.
pub(super) struct CoarseQueryUniforms {
    /// Per chunk (chunk order): its parameters, the selector of its
    /// [`CoarseQuerySteps::first_level`] step.
    pub first_level: Vec<Uniforms>,
    /// The whole head's parameters, the selectors of [`CoarseQuerySteps::shared`].
    pub shared: Uniforms,
}

impl CoarseQueryUniforms {
    /// The uniforms of `steps` with each chunk's parameter block (`chunks`, chunk order) and the
    /// whole head's (`head`).
    pub fn new(
        ctx: &GpuContext,
        steps: &CoarseQuerySteps,
        chunks: impl IntoIterator<Item = Params>,
        head: &Params,
    ) -> Result<Self> {
        let first_level = chunks
            .into_iter()
            .zip(&steps.first_level)
            .map(|(params, step)| Uniforms::new(ctx, &params, &[*step]))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            first_level,
            shared: Uniforms::new(ctx, head, &steps.shared)?,
        })
    }
}
