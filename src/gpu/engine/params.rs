//! The uniform parameter block, mirrored exactly from `shaders/shared/params.wgsl` (encase
//! lays it out by WGSL's uniform rules; a test checks the size against naga's layout).

use encase::ShaderType;

use crate::error::{FmaError, Result};
use crate::variants::Variants;

/// Most coarse levels a plan may have (the WGSL array length). n < 2^32 with m >= 1 needs
/// at most 31.
pub const MAX_LEVELS: usize = 32;

/// One coarse level as the shaders see it.
#[derive(Clone, Copy, Debug, Default, ShaderType)]
pub struct LevelInfo {
    /// w_l = m 2^(l-1).
    pub window: u32,
    /// ceil(n / w_l).
    pub windows: u32,
    /// First row of the level in the concatenated coarse buffer.
    pub row_offset: u32,
    /// First element of the level's (d, p, w_l) weights in the learned weight buffers.
    pub weight_offset: u32,
}

/// Mirror of WGSL `Params`.
#[derive(Clone, Copy, Debug, Default, ShaderType)]
pub struct Params {
    pub n: u32,
    pub d: u32,
    pub m: u32,
    pub p: u32,
    pub num_levels: u32,
    pub causal: u32,
    pub count_correction: u32,
    pub learned: u32,
    pub batch_heads: u32,
    pub coarse_rows: u32,
    pub tiles_per_block: u32,
    pub total_workgroups: u32,
    pub workgroups_x: u32,
    pub scale: f32,
    pub coarse_queries: u32,
    pub pooled: u32,
    pub weight_stride: u32,
    pub bias_stride: u32,
    /// Global row of the first bound row of Q and O, for FMA of K and V too (0 unless one
    /// head's sequence is split across bindings, `crate::plan::SplitPlan`).
    pub row_base: u32,
    /// First token the dispatch covers (0 unless split).
    pub chunk_lo: u32,
    /// One past the last token the dispatch covers (n unless split).
    pub chunk_hi: u32,
    /// Dense attention: the first key of the dispatch (0 unless its keys come in chunks,
    /// `crate::plan::DensePlan::key_chunks`).
    pub key_lo: u32,
    /// Dense attention: one past the dispatch's last key (n unless split).
    pub key_hi: u32,
    /// Key length (rows of K and V per head): n unless a dense problem has more or fewer keys
    /// than queries.
    pub n_kv: u32,
    /// Query heads per K/V head (1: multi-head attention): K, V, K~ and V~ hold
    /// `batch_heads / kv_group` heads, and query head `bh` reads K/V head `bh / kv_group`.
    pub kv_group: u32,
    /// Variable-length batches: the number of sequences (0: a batch of equal sequences).
    pub seqs: u32,
    /// Variable-length batches: query heads per sequence.
    pub heads: u32,
    /// Variable-length batches: rows between the query heads of a sequence.
    pub q_head_stride: u32,
    /// Variable-length batches: rows between the K/V heads of a sequence.
    pub kv_head_stride: u32,
    /// First bias element in the weight binding of the downsample pass
    /// (`engine::weights::WeightBuffers`).
    pub bias_base: u32,
    /// 2D grids (algorithm.md §9): the grid width W, tokens n = H W in raster order; 0 in 1D.
    pub grid_w: u32,
    /// Variable-length batches, passes without a binding to spare for the sequence table: the
    /// f32 element of their scratch buffer (the backward's stats and dK~) where a copy of the
    /// table starts.
    pub table_at: u32,
    /// Dense attention: the first bound row of K and V (a split head's key chunk; 0 unless
    /// split).
    pub key_base: u32,
    /// The backward's coarse dK~/dV~ pass: the f32 element of dK~ and dV~ where the partial
    /// sums of its reader chunks start (`plan::BackwardPlan::partials_at`).
    pub partials_at: u32,
    /// The same in dQ~ for the query weights' gradients
    /// (`plan::BackwardPlan::q_partials_at`).
    pub q_partials_at: u32,
    /// Softcap C (issue 30; read where the pipeline's `SOFTCAP` is on).
    pub softcap: f32,
    /// Query heads of a sequence: problem qh's sink is that of head qh mod sink_heads (varlen:
    /// qh / seqs).
    pub sink_heads: u32,
    /// The caller's query head of problem 0, mod `sink_heads` (a run of heads of tensors over
    /// one binding: `HeadSpan::first`).
    pub head_base: u32,
    /// Window: keys t >= i - window_left.
    pub window_left: u32,
    /// Window: keys t <= i + window_right.
    pub window_right: u32,
    /// The dense backward of a split head: 1 where a dispatch adds to the dQ or dK/dV an
    /// earlier (query chunk, key chunk) pair left (`plan::DenseBackwardSplitPlan`); 0 unsplit.
    pub accumulate: u32,
    /// The backward's coarse dK~/dV~ pass and its combine rounds: the first row of the level
    /// (a multiple of p) of this dispatch's group of rows, whose reader chunks' partial sums
    /// start at `partials_at` (a split head's level in groups of rows that fit one binding,
    /// `plan::DkvRowGroup`; 0 otherwise).
    pub dkv_row_lo: u32,
    /// Rows of that group; 0: every row of the level (unsplit).
    pub dkv_rows: u32,
    /// The first row of this dispatch's workgroups within that group (a multiple of p; a
    /// split head's later chunk: the windows its tokens may read, `plan::DkvChunkRows`); 0:
    /// the group's first. Also keeps `levels` at a multiple of 16 bytes.
    pub dkv_first: u32,
    pub levels: [LevelInfo; MAX_LEVELS],
    /// Sink logits, four query heads per entry (`MAX_SINK_HEADS`).
    pub sinks: [Quad; MAX_SINK_HEADS / 4],
}

/// Most query heads with sinks: the uniform holds their logits (128 covers today's models;
/// more is a typed error).
pub const MAX_SINK_HEADS: usize = 128;

/// Four f32s, WGSL `vec4<f32>` in the uniform block.
#[derive(Clone, Copy, Debug, Default, ShaderType)]
pub struct Quad {
    pub x: f32,
    pub y: f32,
    pub z: f32,
    pub w: f32,
}

impl Params {
    /// Writes the softmax variants `v` into the block for problems of `heads` query heads per
    /// sequence, whose first problem is query head `head_base` (0 unless a run of heads':
    /// `HeadSpan`).
    /// Sinks beyond [`MAX_SINK_HEADS`] heads are not written ([`check_variants`] refuses them
    /// when a plan is made).
    pub fn set_variants(&mut self, v: &Variants, heads: usize, head_base: usize) {
        self.softcap = v.softcap.unwrap_or(0.0);
        self.sink_heads = heads as u32;
        self.head_base = head_base as u32;
        // The shaders take the window in i32 arithmetic: a window beyond 2^30 keys is the
        // same as one of 2^30 (no sequence reaches it).
        if let Some(w) = v.window {
            self.window_left = w.left.min(1 << 30) as u32;
            self.window_right = w.right.min(1 << 30) as u32;
        }
        if let Some(s) = &v.sinks {
            for (h, &x) in s.iter().enumerate().take(MAX_SINK_HEADS) {
                let q = &mut self.sinks[h / 4];
                *[&mut q.x, &mut q.y, &mut q.z, &mut q.w][h % 4] = x;
            }
        }
    }
}

/// Refuses sinks of more query heads than the parameter block holds ([`MAX_SINK_HEADS`]).
pub fn check_variants(v: &Variants) -> Result<()> {
    match &v.sinks {
        Some(s) if s.len() > MAX_SINK_HEADS => Err(FmaError::LimitExceeded {
            what: "attention sinks".into(),
            requested: s.len() as u64,
            max: MAX_SINK_HEADS as u64,
            unit: "query heads",
            advice: "run the heads in groups of at most 128 per call".into(),
        }),
        _ => Ok(()),
    }
}

/// Mirror of WGSL `DecodeParams` (`shaders/shared/decode_params.wgsl`): the decoding passes'
/// block, one per (step shape, dispatch group); the fields are explained there.
#[derive(Clone, Copy, Debug, Default, ShaderType)]
pub struct DecodeParams {
    pub d: u32,
    pub m: u32,
    pub p: u32,
    pub scale: f32,
    pub count_correction: u32,
    pub learned: u32,
    pub heads: u32,
    pub bh_base: u32,
    pub group_rows: u32,
    pub b_lo: u32,
    pub b_hi: u32,
    pub chunk: u32,
    pub in_rows: u32,
    pub in_offset: u32,
    pub ring: u32,
    pub ring_stride: u32,
    pub levels: u32,
    pub slots: u32,
    pub coarse_stride: u32,
    pub weight_stride: u32,
    pub bias_stride: u32,
    pub page_tokens: u32,
    pub segment: u32,
    pub segments: u32,
    pub partial_stride: u32,
    pub in_row0: u32,
    pub qgroup: u32,
    /// Softcap C (read where the pipeline's `SOFTCAP` is on).
    pub softcap: f32,
    /// Window: keys t >= i - window_left (read where `WINDOW` is on).
    pub window_left: u32,
    /// The half of the lengths a record reads (0 or batch).
    pub lens_in: u32,
    /// The half it writes them advanced to (batch or 0).
    pub lens_out: u32,
    /// Sequences whose lengths the record writes: the batch in its last group, else 0.
    pub lens_count: u32,
    pub level_info: [LevelInfo; MAX_LEVELS],
    /// Sink logits of the query heads of a sequence, four per entry (`MAX_SINK_HEADS`; read
    /// where `SINKS` is on).
    pub sinks: [Quad; MAX_SINK_HEADS / 4],
}

impl DecodeParams {
    /// Writes the softmax variants `v` into the block (sinks beyond [`MAX_SINK_HEADS`] heads
    /// are not written: [`check_variants`] refuses them when the decoder is made).
    pub fn set_variants(&mut self, v: &Variants) {
        self.softcap = v.softcap.unwrap_or(0.0);
        // Positions are below 2^31 (`DecodeConfig::validate`): a longer window is the same.
        self.window_left = v.window.map_or(0, |w| w.left.min(1 << 30) as u32);
        if let Some(s) = &v.sinks {
            for (h, &x) in s.iter().enumerate().take(MAX_SINK_HEADS) {
                let q = &mut self.sinks[h / 4];
                *[&mut q.x, &mut q.y, &mut q.z, &mut q.w][h % 4] = x;
            }
        }
    }
}

/// Mirror of WGSL `LevelSelect` (`shaders/shared/level_select.wgsl`): one per dispatch of the
/// passes whose descriptor asks for it (the per-level forward passes and every backward pass),
/// at a dynamic offset.
#[derive(Clone, Copy, Debug, Default, ShaderType)]
pub struct LevelSelect {
    /// Level index l - 1 (unused by the passes that cover every level at once).
    pub level: u32,
    /// x size of this dispatch's folded grid.
    pub workgroups_x: u32,
    /// Pass-specific word ([`crate::plan::Dispatch::args`]`[0]`).
    pub arg0: u32,
    /// Pass-specific word ([`crate::plan::Dispatch::args`]`[1]`).
    pub arg1: u32,
}

/// Serialises a shader-visible value by WGSL's uniform layout rules.
pub fn to_uniform_bytes<T: ShaderType + encase::internal::WriteInto>(value: &T) -> Result<Vec<u8>> {
    let mut buf = encase::UniformBuffer::new(Vec::new());
    buf.write(value).map_err(|e| FmaError::Gpu {
        stage: "uniform layout".into(),
        message: e.to_string(),
    })?;
    Ok(buf.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::engine::shaders::{compose, Pass, Specialization};
    use crate::plan::SoftmaxFlags;
    use crate::storage::Storage;

    fn naga_size(type_name: &str) -> u32 {
        naga_size_in(Pass::Downsample, type_name)
    }

    fn naga_size_in(pass: Pass, type_name: &str) -> u32 {
        let src = compose(
            pass,
            Specialization {
                wg: 8,
                bk: 8,
                d4: 1,
                grid: false,
                softmax: SoftmaxFlags::PLAIN,
                storage: Storage::F32,
            },
        );
        let module = naga::front::wgsl::parse_str(&src).expect("shader parses");
        let mut layouter = naga::proc::Layouter::default();
        layouter.update(module.to_ctx()).expect("layout");
        let (handle, _) = module
            .types
            .iter()
            .find(|(_, t)| t.name.as_deref() == Some(type_name))
            .expect("type present");
        layouter[handle].size
    }

    #[test]
    fn rust_and_wgsl_uniform_layouts_agree() {
        assert_eq!(Params::min_size().get() as u32, naga_size("Params"));
        assert_eq!(
            LevelSelect::min_size().get() as u32,
            naga_size("LevelSelect")
        );
        assert_eq!(
            to_uniform_bytes(&Params::default()).unwrap().len() as u32,
            naga_size("Params")
        );
        assert_eq!(
            to_uniform_bytes(&DecodeParams::default()).unwrap().len() as u32,
            naga_size_in(Pass::DecodeAttention, "DecodeParams")
        );
    }
}
