//! The plan of exact dense attention: one dispatch over every (query tile, head).

use super::dispatch::{attention_spec, fold, Dispatch};
use super::forward::check_tensors;
use super::limits::KernelLimits;
use super::pass::Pass;
use crate::error::{FmaError, Result};
use crate::shape::Shape;

/// The plan of one dense attention forward.
#[derive(Clone, Debug)]
pub struct DensePlan {
    /// The problem's shape.
    pub shape: Shape,
    /// The attention dispatch.
    pub attention: Dispatch,
    /// Query tiles of the sequence: ceil(n / WG).
    pub tiles: u32,
    /// A padded variable-length batch: the fill of its padding rows, after the attention.
    pub pad: Option<Dispatch>,
    /// A variable-length batch's sequence table (`None` for a batch of equal sequences).
    pub sequences: Option<super::sequences::SeqTable>,
}

impl DensePlan {
    /// Every dispatch in execution order: the attention, then (padded batches) the padding.
    pub fn steps(&self) -> Vec<Dispatch> {
        std::iter::once(self.attention).chain(self.pad).collect()
    }
}

impl DensePlan {
    /// Plans dense attention for `shape` under `limits`.
    pub fn new(shape: Shape, limits: &KernelLimits) -> Result<Self> {
        check_tensors(shape, limits)?;
        Self::without_tensor_bindings(shape, limits)
    }

    /// [`DensePlan::new`] less the check that each tensor fits one storage binding (the plan
    /// of a head that `crate::plan::SplitPlan` cuts into chunks).
    pub(crate) fn without_tensor_bindings(shape: Shape, limits: &KernelLimits) -> Result<Self> {
        shape.validate()?;
        let wg = 64u32.min(limits.max_workgroup);
        let spec = attention_spec(shape.head_dim, wg, limits)?;
        let tiles = (shape.seq as u32).div_ceil(wg);
        let total = shape.batch_heads() as u64 * tiles as u64;
        let total = u32::try_from(total).map_err(|_| FmaError::LimitExceeded {
            what: "the dense dispatch".into(),
            requested: total,
            max: u32::MAX as u64,
            unit: "workgroups",
            advice: "process fewer heads per call, or shorter sequences".into(),
        })?;
        Ok(Self {
            shape,
            attention: Dispatch {
                pass: Pass::DenseAttention,
                level: None,
                workgroups: total,
                grid: fold(total, limits.max_workgroups_per_dim)?,
                spec,
            },
            tiles,
            pad: None,
            sequences: None,
        })
    }
}
