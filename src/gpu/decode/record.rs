//! One record of the decoding passes: C tokens appended to a run of sequences (the history
//! copied into its pages; the ring, the coarse slots and the lengths by the upkeep pass),
//! optionally their queries' attention (FMA or dense), group by group into one compute pass.
//! What a record's shape fixes (its parameter block, level selectors and bind groups) is made
//! once per [`RecordKey`] and kept; a bind group is remade only when a buffer it binds
//! changed.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use crate::error::{FmaError, Result};
use crate::gpu::engine::buffers::uniform;
use crate::gpu::engine::params::{to_uniform_bytes, DecodeParams, LevelInfo, MAX_LEVELS};
use crate::gpu::engine::passes::Role;
use crate::gpu::engine::pipelines::poisoned;
use crate::gpu::engine::record::{record_step, BindingIdentity, Pipes, Resources, Selects};
use crate::plan::{DenseCut, Dispatch, Pass};

use super::state::State;
use super::{DecodeMode, Decoder};

/// What one record does besides appending.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Work {
    /// Append only (a prefill's cache).
    Ingest,
    /// Append, then attend (FMA, or dense over the cut's pages and segments).
    Attend(DecodeMode, DenseCut),
}

/// Everything the uniforms of one group's record depend on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct RecordKey {
    group: usize,
    chunk: usize,
    in_rows: usize,
    in_offset: usize,
    in_row0: usize,
    seqs: (usize, usize),
    work: Work,
    /// The record's last group: it writes the advanced lengths.
    advance: bool,
    /// The half of the lengths the record reads.
    parity: usize,
}

/// Bind groups kept per step of a record shape: the last few sets of buffers it was bound to
/// (a caller alternating between a few sets of step tensors, double-buffered, finds each),
/// most recent first.
const KEPT_GROUPS: usize = 4;

/// A group's parameter block, its steps and their level selectors, and the bind groups each
/// step had last, with the buffers each was made from.
pub(crate) struct Uniforms {
    params: wgpu::Buffer,
    selects: Selects,
    steps: Vec<Dispatch>,
    groups: Mutex<HashMap<usize, Vec<(BindingIdentity, wgpu::BindGroup)>>>,
}

/// The tensors of one record: K, V (cache rows in_row0.., in_rows each, from in_offset), and
/// for attention Q (the same layout over query rows) and O, LSE of shape (batch, heads, chunk).
pub(super) struct Io<'a> {
    pub q: Option<&'a wgpu::Buffer>,
    pub k: &'a wgpu::Buffer,
    pub v: &'a wgpu::Buffer,
    pub out: Option<&'a wgpu::Buffer>,
    pub lse: Option<&'a wgpu::Buffer>,
    pub chunk: usize,
    pub in_rows: usize,
    pub in_offset: usize,
    /// Sequences appended to; the bound rows start at the first one's first head.
    pub seqs: Range<usize>,
}

impl Decoder {
    /// Records the append of `io.chunk` tokens to `io.seqs` (and `work`) into `enc`, and
    /// advances the host's lengths. Every check runs before anything is recorded.
    pub(super) fn record(
        &self,
        enc: &mut wgpu::CommandEncoder,
        st: &mut State,
        pipes: &Pipes,
        io: &Io<'_>,
        work: Work,
    ) -> Result<()> {
        let l = &self.layout;
        // Cache rows: K/V heads (grouped-query attention: fewer than the query heads).
        let (h, d) = (l.kv_heads, l.head_dim);
        if io.chunk == 0 {
            return Err(FmaError::InvalidConfig {
                what: "tokens per step",
                value: "0".into(),
                allowed: ">= 1".into(),
            });
        }
        if matches!(work, Work::Attend(..)) && io.chunk > l.max_chunk {
            return Err(FmaError::InvalidConfig {
                what: "tokens per step",
                value: io.chunk.to_string(),
                allowed: format!("1 ..= {} (DecodeConfig::max_chunk)", l.max_chunk),
            });
        }
        let mut longest = 0;
        for b in io.seqs.clone() {
            let after = st.lens[b] + io.chunk;
            if after > l.max_len {
                return Err(FmaError::LimitExceeded {
                    what: format!(
                        "sequence {b} ({} tokens held, {} appended)",
                        st.lens[b], io.chunk
                    ),
                    requested: after as u64,
                    max: l.max_len as u64,
                    unit: "tokens (the decoder's max_len)",
                    advice: "reset the sequence, or make a decoder with a larger max_len".into(),
                });
            }
            longest = longest.max(after);
        }
        if matches!(work, Work::Attend(DecodeMode::Fma, _)) {
            self.cfg.check_fma_window()?;
        }
        // A window: both modes are exact windowed attention over the ring (decode_attention
        // with no coarse level); the cache has no history to run the dense passes over.
        let work = match work {
            Work::Attend(DecodeMode::Dense, _) if l.window.is_some() => {
                Work::Attend(DecodeMode::Fma, DenseCut::default())
            }
            w => w,
        };
        let dense = matches!(work, Work::Attend(DecodeMode::Dense, _));
        if dense && l.page_tokens == 0 {
            return Err(FmaError::InvalidConfig {
                what: "dense decoding",
                value: "a cache without history".into(),
                allowed: "DecodeConfig::history(true)".into(),
            });
        }
        let rows = io.seqs.start * h..io.seqs.end * h;
        let in_row0 = rows.start;

        let groups: Vec<(usize, Range<usize>)> = l
            .groups()
            .into_iter()
            .enumerate()
            .filter(|(_, g)| g.start < rows.end && rows.start < g.end)
            .collect();
        let work = match work {
            Work::Attend(DecodeMode::Dense, _) => {
                Work::Attend(DecodeMode::Dense, l.dense_cut(longest))
            }
            w => w,
        };
        let mut made = Vec::new();
        for (i, (g, _)) in groups.iter().enumerate() {
            let key = RecordKey {
                group: *g,
                chunk: io.chunk,
                in_rows: io.in_rows,
                in_offset: io.in_offset,
                in_row0,
                seqs: (io.seqs.start, io.seqs.end),
                work,
                advance: i + 1 == groups.len(),
                parity: st.parity,
            };
            made.push(
                self.uniforms
                    .get_or_make(key, || self.make_uniforms(&key))?,
            );
        }
        // Every check has passed (what follows fails only on a bug): the history, by buffer
        // copies of each row's new tokens into its pages.
        if l.page_tokens > 0 {
            st.grow_pages(&self.ctx.device, longest);
            let t_page = l.page_tokens;
            // Element bytes of K, V and the pages (f16: d is even, so every copy is whole
            // 4-byte words; `Decoder::new` checks it).
            let eb = l.storage.bytes();
            for bh in rows.clone() {
                let (g, local) = (bh / l.group, bh % l.group);
                let mut t = st.lens[bh / h];
                let end = t + io.chunk;
                let mut src = (((bh - in_row0) * io.in_rows + io.in_offset) * d) as u64 * eb;
                while t < end {
                    let run = (end - t).min(t_page - t % t_page);
                    let page = &st.pages[g][t / t_page];
                    let dst = ((local * t_page + t % t_page) * d) as u64 * eb;
                    let bytes = (run * d) as u64 * eb;
                    enc.copy_buffer_to_buffer(io.k, src, &page.k, dst, bytes);
                    enc.copy_buffer_to_buffer(io.v, src, &page.v, dst, bytes);
                    src += bytes;
                    t += run;
                }
            }
        }

        let partials = if dense {
            Some(st.partials(&self.ctx.device).clone())
        } else {
            None
        };
        // Bind groups first (found or made), then the pass that uses them.
        let mut bound = Vec::new();
        for ((g, range), u) in groups.iter().zip(&made) {
            let ring = l.ring_bytes();
            let coarse = l.coarse_stride as u64 * 4;
            let n = range.len() as u64;
            let mut res = Resources::default()
                .with(Role::Params, &u.params)
                .with(Role::K, io.k)
                .with(Role::V, io.v)
                .with(Role::Lens, &st.lens_gpu)
                .with(Role::Weights, &self.weights.w)
                .with(Role::Biases, &self.weights.b)
                .with_range(Role::Ring, &st.ring, range.start as u64 * ring, n * ring)
                .with_range(
                    Role::CoarseSlots,
                    &st.coarse,
                    range.start as u64 * coarse,
                    n * coarse,
                );
            if let Some(q) = io.q {
                res = res.with(Role::Q, q);
            }
            if let (Some(o), Some(lse)) = (io.out, io.lse) {
                res = res.with(Role::Out, o).with(Role::Lse, lse);
            }
            if let Some(p) = &partials {
                res = res.with(Role::Partials, p);
            }
            let mut kept = u.groups.lock().map_err(poisoned)?;
            let mut groups_k = Vec::with_capacity(u.steps.len());
            for (k, step) in u.steps.iter().enumerate() {
                // The dense pass binds its step's history page.
                let page_res;
                let res_k = if step.pass == Pass::DecodeDense {
                    let page = &st.pages[*g][step.level.unwrap_or(0) as usize];
                    let mut r = Resources::default()
                        .with(Role::Params, &u.params)
                        .with(Role::Lens, &st.lens_gpu)
                        .with(Role::PageK, &page.k)
                        .with(Role::PageV, &page.v);
                    if let Some(q) = io.q {
                        r = r.with(Role::Q, q);
                    }
                    if let Some(p) = &partials {
                        r = r.with(Role::Partials, p);
                    }
                    page_res = r;
                    &page_res
                } else {
                    &res
                };
                let identity = res_k.identity(step.pass);
                let kept_k = kept.entry(k).or_default();
                let group = match kept_k.iter().position(|(id, _)| *id == identity) {
                    Some(at) => {
                        let hit = kept_k.remove(at);
                        let group = hit.1.clone();
                        kept_k.insert(0, hit);
                        group
                    }
                    None => {
                        let group = res_k.bind_group(&self.ctx, step.pass)?;
                        self.bind_groups.fetch_add(1, Ordering::Relaxed);
                        kept_k.insert(0, (identity, group.clone()));
                        kept_k.truncate(KEPT_GROUPS);
                        group
                    }
                };
                groups_k.push(group);
            }
            if !u.selects.has_group() {
                self.bind_groups.fetch_add(1, Ordering::Relaxed);
            }
            bound.push(groups_k);
        }
        let mut cpass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("decode"),
            timestamp_writes: None,
        });
        for (u, groups_k) in made.iter().zip(&bound) {
            for (k, group) in groups_k.iter().enumerate() {
                record_step(
                    &self.ctx,
                    &mut cpass,
                    &u.steps,
                    k,
                    pipes,
                    Some(&u.selects),
                    group,
                )?;
            }
        }
        drop(cpass);
        for b in io.seqs.clone() {
            st.lens[b] += io.chunk;
        }
        st.parity ^= 1;
        Ok(())
    }

    /// The pipelines of every decoding pass (one specialisation per decoder), built on first use
    /// and kept: made before the state is locked, since building may wait.
    pub(super) async fn pipes(&self) -> Result<Arc<Pipes>> {
        if let Some(p) = self.pipes.lock().map_err(poisoned)?.as_ref() {
            return Ok(p.clone());
        }
        let l = &self.layout;
        let limits = &self.limits;
        // Every pass a record may have: a step (one pass where fused), the upkeep alone (a
        // prefill, a dense step) and the attention apart (a step too long to fuse).
        let mut steps = l.fma_steps(1, 1, true, 1, limits)?;
        steps.extend(l.fma_steps(1, 1, false, 1, limits)?);
        steps.extend(l.fma_steps(1, l.block + 2, true, 1, limits)?);
        if l.page_tokens > 0 {
            steps.extend(l.dense_steps(1, 1, l.dense_cut(1), limits)?);
        }
        let pipes = Arc::new(Pipes::new(&self.ctx, &steps).await?);
        *self.pipes.lock().map_err(poisoned)? = Some(pipes.clone());
        Ok(pipes)
    }

    fn make_uniforms(&self, key: &RecordKey) -> Result<Uniforms> {
        let l = &self.layout;
        let range = l.groups()[key.group].clone();
        let (rows, d, p) = (range.len(), l.head_dim, l.rank);
        let lens_count = if key.advance { l.batch } else { 0 };
        let mut steps = l.fma_steps(
            rows,
            key.chunk,
            matches!(key.work, Work::Attend(DecodeMode::Fma, _)),
            lens_count,
            &self.limits,
        )?;
        let mut segment = 0;
        if let Work::Attend(DecodeMode::Dense, cut) = key.work {
            steps.extend(l.dense_steps(rows, key.chunk, cut, &self.limits)?);
            segment = cut.segment;
        }
        if l.levels > MAX_LEVELS {
            return Err(FmaError::LimitExceeded {
                what: "the decoder's cache".into(),
                requested: l.levels as u64,
                max: MAX_LEVELS as u64,
                unit: "coarse levels",
                advice: "use a larger block size m or a smaller max_len".into(),
            });
        }
        let mut level_info = [LevelInfo::default(); MAX_LEVELS];
        let mut offset = 0usize;
        for (lvl, info) in level_info.iter_mut().enumerate().take(l.levels) {
            let w = l.window(lvl);
            *info = LevelInfo {
                window: w as u32,
                weight_offset: offset as u32,
                ..Default::default()
            };
            offset += d * p * w;
        }
        let mut params = DecodeParams {
            d: d as u32,
            m: l.block as u32,
            p: p as u32,
            scale: 1.0 / (d as f32).sqrt(),
            count_correction: self.cfg.fma.count_correction as u32,
            learned: self.learned() as u32,
            heads: l.kv_heads as u32,
            qgroup: l.qgroup() as u32,
            bh_base: range.start as u32,
            group_rows: rows as u32,
            b_lo: key.seqs.0 as u32,
            b_hi: key.seqs.1 as u32,
            chunk: key.chunk as u32,
            in_rows: key.in_rows as u32,
            in_offset: key.in_offset as u32,
            ring: l.ring as u32,
            ring_stride: l.ring_stride as u32,
            levels: l.levels as u32,
            slots: l.slots as u32,
            coarse_stride: l.coarse_stride as u32,
            weight_stride: self.weights.weight_stride,
            bias_stride: self.weights.bias_stride,
            page_tokens: l.page_tokens as u32,
            segment: segment as u32,
            segments: l.segments as u32,
            partial_stride: l.partial_stride as u32,
            in_row0: key.in_row0 as u32,
            lens_in: (key.parity * l.batch) as u32,
            lens_out: ((1 - key.parity) * l.batch) as u32,
            lens_count: lens_count as u32,
            level_info,
            ..Default::default()
        };
        params.set_variants(&self.cfg.variants);
        // Two buffers, each written once here: the parameter block and the selectors.
        self.uniform_buffers.fetch_add(2, Ordering::Relaxed);
        Ok(Uniforms {
            params: uniform(
                &self.ctx.device,
                &self.ctx.queue,
                "decode params",
                &to_uniform_bytes(&params)?,
            ),
            selects: Selects::new(&self.ctx, &steps)?,
            steps,
            groups: Mutex::new(HashMap::new()),
        })
    }
}
