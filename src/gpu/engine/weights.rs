//! The learned weights of every level on the GPU, uploaded once per executor (the FMA forward
//! and backward, the decoder).

use crate::config::{Downsample, FmaConfig, Queries};
use crate::error::Result;
use crate::gpu::engine::buffers::storage;
use crate::gpu::engine::context::GpuContext;
use crate::plan::KernelLimits;
use crate::weights::LevelWeights;

/// Learned weights on the GPU: `w` = [keys | values | queries], each kind every level's
/// (d, p, w_l) weights concatenated (`weight_stride` elements apart), followed at element
/// `bias_base` by the biases laid out alike; `b` the biases alone, each kind every level's
/// (d, p) biases (`bias_stride` apart). Queries only with coarse queries; 16-byte dummies in
/// Average mode. (The downsample pass reads biases from `w`: WebGPU allows 8 storage bindings
/// per stage, and it needs its eighth for the sequence table.)
pub(crate) struct WeightBuffers {
    pub(crate) w: wgpu::Buffer,
    pub(crate) b: wgpu::Buffer,
    pub(crate) weight_stride: u32,
    pub(crate) bias_stride: u32,
    pub(crate) bias_base: u32,
}

impl WeightBuffers {
    pub(crate) fn new(ctx: &GpuContext, cfg: &FmaConfig, limits: &KernelLimits) -> Result<Self> {
        type Pick = fn(&LevelWeights) -> &Vec<f32>;
        let (w_kinds, b_kinds): (Vec<Pick>, Vec<Pick>) = match cfg.queries {
            Queries::Fine => (vec![|l| &l.wk, |l| &l.wv], vec![|l| &l.bk, |l| &l.bv]),
            Queries::Coarse => (
                vec![|l| &l.wk, |l| &l.wv, |l| &l.wq],
                vec![|l| &l.bk, |l| &l.bv, |l| &l.bq],
            ),
        };
        let concat = |kinds: &[Pick]| -> (Vec<f32>, usize) {
            match &cfg.downsample {
                Downsample::Learned(w) => {
                    let stride = w.levels.iter().map(|l| kinds[0](l).len()).sum();
                    let all = kinds
                        .iter()
                        .flat_map(|f| w.levels.iter().flat_map(|l| f(l).iter().copied()))
                        .collect();
                    (all, stride)
                }
                Downsample::Average => (Vec::new(), 0),
            }
        };
        let upload = |label: &str, data: Vec<f32>| -> Result<wgpu::Buffer> {
            let bytes = data.len() as u64 * 4;
            let max = limits.max_binding.min(limits.max_buffer);
            if bytes > max {
                return Err(crate::FmaError::LimitExceeded {
                    what: format!("the learned {label} of every level"),
                    requested: bytes,
                    max,
                    unit: "bytes in one storage binding",
                    advice: "Learned weights hold d p w_l floats per level: use fewer levels \
                             (weights for a shorter sequence), a smaller rank p, or Average mode"
                        .into(),
                });
            }
            let buf = storage(&ctx.device, label, bytes, wgpu::BufferUsages::COPY_DST);
            ctx.queue.write_buffer(&buf, 0, bytemuck::cast_slice(&data));
            Ok(buf)
        };
        let (mut w, weight_stride) = concat(&w_kinds);
        let (b, bias_stride) = concat(&b_kinds);
        let bias_base = w.len();
        w.extend_from_slice(&b);
        let stride = |x: usize| {
            u32::try_from(x).map_err(|_| crate::FmaError::LimitExceeded {
                what: "the learned weights of one tensor kind".into(),
                requested: x as u64,
                max: u32::MAX as u64,
                unit: "elements",
                advice: "use fewer levels, a smaller rank p, or Average mode".into(),
            })
        };
        Ok(Self {
            weight_stride: stride(weight_stride)?,
            bias_stride: stride(bias_stride)?,
            bias_base: stride(bias_base)?,
            w: upload("weights", w)?,
            b: upload("biases", b)?,
        })
    }
}
