//! Command-line arguments of `multipole-attn` (clap derive).

use clap::{Args, Parser, Subcommand, ValueEnum};
use multipole_attn::Grid;
use std::path::PathBuf;

/// `--grid H,W`: two positive integers.
pub(crate) fn parse_grid(s: &str) -> Result<Grid, String> {
    let bad = || format!("expected H,W (two positive integers, e.g. 64,48), got {s:?}");
    let (h, w) = s.split_once(',').ok_or_else(bad)?;
    let side = |x: &str| {
        x.trim()
            .parse::<usize>()
            .ok()
            .filter(|&v| v > 0)
            .ok_or_else(bad)
    };
    Ok(Grid::new(side(h)?, side(w)?))
}

/// Fast Multipole Attention on the GPU (wgpu), with an f64 CPU reference.
#[derive(Debug, Parser)]
#[command(name = "multipole-attn", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run FMA (or exact dense attention) on Q, K, V from .npy files and write O (and LSE).
    Run(RunArgs),
    /// Gradients of FMA (or, with --dense, exact attention): forward and backward for a given
    /// dO; writes dQ, dK, dV and the learned weights' gradients to an .npz.
    Grad(GradArgs),
    /// Incremental causal decoding: prefill the first P tokens of Q, K, V, then append the rest
    /// C tokens at a time through the multi-level KV cache; writes all n rows of O.
    // `run`'s options that do not apply to decoding stay out of its help (decode.rs refuses
    // them when given: decoding is causal, fine-query, 1D and one length per batch row).
    #[command(
        mut_arg("causal", |a| a.hide(true)),
        mut_arg("queries", |a| a.hide(true)),
        mut_arg("grid", |a| a.hide(true)),
        mut_arg("seqlens", |a| a.hide(true)),
        mut_arg("seqlens_kv", |a| a.hide(true)),
        mut_arg("lengths", |a| a.hide(true))
    )]
    Decode(DecodeArgs),
    /// List every GPU adapter wgpu finds, with the limits and features this library uses.
    Info,
    /// Run the conformance suite (FMA and dense attention against the f64 CPU reference) on
    /// every adapter found, on every backend; exit 1 if any adapter fails a case.
    Doctor(DoctorArgs),
    /// Print the dispatches a problem would run (per dispatch: pass, workgroups, invocations,
    /// serial_rows, rows) without opening a GPU.
    Plan(crate::plan::PlanArgs),
}

/// Arguments of `multipole-attn doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Only adapters on these backends (comma-separated: vulkan, gl, metal, dx12); default all.
    #[arg(long, value_delimiter = ',')]
    pub backends: Vec<String>,
    /// Fail unless an adapter is found on each of these backends (comma-separated), so that a
    /// CI machine missing a driver fails instead of quietly testing less.
    #[arg(long, value_delimiter = ',')]
    pub require: Vec<String>,
    /// Print every case, not only the failed ones.
    #[arg(long)]
    pub verbose: bool,
    /// Print only the report as JSON on stdout (the document the browser page's "Test this
    /// GPU" copies): per adapter its identity, kernels, passed, failed, worst error, time and
    /// every case.
    #[arg(long)]
    pub json: bool,
    /// Run dense attention on cooperative matrices (tensor cores) where the adapter offers a
    /// fitting shape (`ContextOptions::cooperative_matrix`, opt-in until it has passed here on
    /// a real GPU); its cases are then held to the f16 bound `conformance::COOP_TOL`.
    #[arg(long)]
    pub cooperative_matrix: bool,
}

/// How coarse keys and values are made from the fine ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DownsampleArg {
    /// Mean over each sub-window (no parameters).
    Average,
    /// Learned per-channel basis functions (from --weights, or the box initialisation).
    Learned,
}

/// The element type of Q, K, V and O on the GPU (`--storage`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StorageArg {
    /// float32 on every adapter.
    F32,
    /// float16 (needs SHADER_F16): inputs rounded to f16, arithmetic and softmax in f32, O
    /// written as float16.
    F16,
}

impl StorageArg {
    /// The library's storage.
    pub fn storage(self) -> multipole_attn::Storage {
        match self {
            StorageArg::F32 => multipole_attn::Storage::F32,
            StorageArg::F16 => multipole_attn::Storage::F16,
        }
    }
}

/// At which resolution queries attend to the coarse levels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum QueriesArg {
    /// Every query at full resolution: O(n log n), causal or not.
    Fine,
    /// Queries pooled per level like the keys: O(n); bidirectional only.
    Coarse,
}

/// Arguments of `multipole-attn run`.
#[derive(Debug, Args)]
#[command(after_help = "\
Arrays: .npy, float16, float32 or float64: Q of shape (n, d) or (batch, heads, n, d), K and V of
(n_kv, d) or (batch, kv_heads, n_kv, d): fewer K/V heads than Q's (grouped-query attention,
kv_heads dividing heads) and another length (cross-length: n_kv != n) are allowed. O is written
with the shape of Q; LSE with shape (n,) or (batch, heads, n). Both are float32 on the GPU and
float64 with --reference (float64 inputs keep their precision there).

Cross-length attention: --dense takes any n_kv (bidirectional: every key; --causal: bottom-right
aligned, query i sees key j iff j <= i + n_kv - n; a query with no key gets O = 0, LSE = -inf).
FMA takes n_kv > n with --causal and fine queries: the n queries are the last n positions of a
causal FMA over the n_kv tokens (a chunk of a sequence attending to itself and what precedes
it); other cross-length FMA is bad input (exit 2).

Softmax variants (docs/variants.md), dense and FMA fine queries, combinable: --softcap C (every
logit l becomes C tanh(l / C)), --sinks S.npy (one logit per query head in every softmax's
denominator), --window L,R (query i sees keys i - L ..= i + R; R = 0 with --causal). FMA runs a
window as its near field alone (block m >= L and R); coarse queries, --grid with a window and a
head over one storage binding refuse variants (exit 2). `decode` takes them too (R = 0).

Learned weights (.npz): for levels l = 1, 2, ... keys k_w{l}, v_w{l} of shape (d, p, m*2^(l-1))
(with --grid: (d, p, s_l, s_l), s_l = m*2^(l-1)) and k_b{l}, v_b{l} of shape (d, p), float32 or
float64. Levels are read until k_w{l} is absent.
With --queries coarse, q_w{l} (d, p, m*2^(l-1)) and q_b{l} (d, p) pool the queries; a level
without them uses the box initialisation for its queries.
--weights alone implies --downsample learned; --weights with --downsample average is an error.

Exit codes: 0 success, 2 bad input (arguments, files, shapes, weights), 1 GPU or runtime failure.")]
pub struct RunArgs {
    /// Queries, .npy of shape (n, d) or (batch, heads, n, d).
    #[arg(long, value_name = "Q.npy")]
    pub q: PathBuf,
    /// Keys, same shape as Q.
    #[arg(long, value_name = "K.npy")]
    pub k: PathBuf,
    /// Values, same shape as Q.
    #[arg(long, value_name = "V.npy")]
    pub v: PathBuf,
    /// Where to write the output O (same shape as Q); for `grad`, the gradients .npz.
    #[arg(long, value_name = "O.npy")]
    pub out: PathBuf,
    /// Fine block size m (also the level-1 window).
    #[arg(long, value_name = "M", default_value_t = 64)]
    pub block: usize,
    /// Coarse rank p: coarse keys per window; must divide m.
    #[arg(long, value_name = "P", default_value_t = 2)]
    pub rank: usize,
    /// Causal mask, bottom-right aligned (as FlashAttention): query i of n sees key j of n_kv
    /// iff j <= i + n_kv - n, so the queries are the last n of the keys' positions (n_kv = n:
    /// keys t <= i). PyTorch's `is_causal` aligns top-left (j <= i) instead; the two agree when
    /// n_kv = n.
    #[arg(long)]
    pub causal: bool,
    /// Downsampling of coarse keys/values [default: average, or learned when --weights is given].
    #[arg(long, value_enum, value_name = "MODE")]
    pub downsample: Option<DownsampleArg>,
    /// Learned downsampling weights (.npz); implies --downsample learned.
    #[arg(long, value_name = "W.npz")]
    pub weights: Option<PathBuf>,
    /// Do not add ln(token count) to the logits of coarse keys.
    #[arg(long)]
    pub no_count_correction: bool,
    /// Fine queries (O(n log n)) or coarse queries pooled per level (O(n), bidirectional only).
    #[arg(long, value_enum, value_name = "KIND", default_value = "fine")]
    pub queries: QueriesArg,
    /// The tokens lie on an H x W grid in raster order (2D FMA, algorithm.md §9): n must be
    /// H*W; --block is the cell side r (cells r x r, a 3 x 3 near field), --rank the bands per
    /// cell (must divide r); learned weights k_w{l} have shape (d, p, s_l, s_l),
    /// s_l = r*2^(l-1). Not with --causal.
    #[arg(long, value_name = "H,W", value_parser = parse_grid)]
    pub grid: Option<Grid>,
    /// Exact dense softmax attention instead of FMA (the FMA options do not apply).
    #[arg(long, conflicts_with_all = ["block", "rank", "downsample", "weights", "no_count_correction", "queries", "grid"])]
    pub dense: bool,
    /// Run the f64 CPU reference instead of the GPU (slow; for checking).
    #[arg(long)]
    pub reference: bool,
    /// Element type of Q, K, V and O on the GPU: f32, or f16 on adapters with SHADER_F16
    /// (`info` says; without it the run fails with exit code 1). With f16, float16, float32
    /// and float64 inputs are rounded to f16, scores, softmax and sums stay f32, and O (and
    /// grad's gradients) are written as float16; the LSE stays float32.
    #[arg(
        long,
        value_enum,
        value_name = "TYPE",
        default_value = "f32",
        conflicts_with = "reference"
    )]
    pub storage: StorageArg,
    /// Also write the per-row log-sum-exp of the logits.
    #[arg(long, value_name = "LSE.npy")]
    pub lse: Option<PathBuf>,
    /// A packed variable-length batch: the lengths (summing to n; 0 is an empty sequence, which
    /// has no rows) of sequences laid one after another along the sequence axis of arrays
    /// (n, d) or (1, heads, n, d); each is its own attention problem, no token attends across
    /// sequences.
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "N0,N1,..",
        conflicts_with = "lengths"
    )]
    pub seqlens: Option<Vec<usize>>,
    /// With --seqlens: the key lengths of the same sequences (one each, summing to K's and
    /// V's length; FlashAttention's cu_seqlens_k as lengths), when they differ from the query
    /// lengths. K and V are packed by these; each sequence's queries attend to its own keys
    /// (with --causal bottom-right aligned: the queries are the last of its keys' positions;
    /// a sequence with queries but no key gets O = 0, LSE = -inf). FMA takes them with
    /// --causal and at least as many keys as queries per sequence (not in `grad` on the GPU).
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "K0,K1,..",
        requires = "seqlens"
    )]
    pub seqlens_kv: Option<Vec<usize>>,
    /// A padded batch: one length (0..=n) per batch row of arrays (batch, heads, n, d);
    /// positions at or beyond a row's length are neither attended nor attended from (O = 0,
    /// LSE = -inf there).
    #[arg(long, value_delimiter = ',', value_name = "L0,L1,..")]
    pub lengths: Option<Vec<usize>>,
    /// Logit softcap C > 0 (Gemma 2): every logit l, fine or coarse, becomes C tanh(l / C);
    /// FMA's count correction is added after the cap.
    #[arg(long, value_name = "C")]
    pub softcap: Option<f32>,
    /// Attention sinks (gpt-oss): .npy of shape (heads,), one logit S_h per query head whose
    /// term exp(S_h) joins every row's softmax denominator and carries no value
    /// (O_i = sum_j e^{l_ij} v_j / (e^{S_h} + sum_j e^{l_ij}); the LSE includes it). `grad`
    /// also writes `dsinks` (heads,).
    #[arg(long, value_name = "S.npy")]
    pub sinks: Option<PathBuf>,
    /// Sliding window: query i sees key j iff i - L <= j <= i + R (bottom-right aligned for
    /// K/V longer than Q, as --causal); with --causal R must be 0. Exact for --dense (key tiles
    /// outside the band skipped); FMA runs it as its near field with no coarse level (fine
    /// queries, 1D). `decode` keeps a ring of the last L + C keys and values (R = 0).
    #[arg(long, value_name = "L,R", value_parser = parse_window)]
    pub window: Option<multipole_attn::Window>,
}

/// `--window L,R`: two non-negative integers.
fn parse_window(s: &str) -> Result<multipole_attn::Window, String> {
    let parts: Vec<&str> = s.split(',').collect();
    let [l, r] = parts[..] else {
        return Err(format!(
            "expected L,R (two non-negative integers), got {s:?}"
        ));
    };
    let n = |x: &str| {
        x.trim()
            .parse::<usize>()
            .map_err(|e| format!("{x:?} in --window {s}: {e} (L and R are non-negative integers)"))
    };
    Ok(multipole_attn::Window {
        left: n(l)?,
        right: n(r)?,
    })
}

/// Arguments of `multipole-attn grad`: those of `run` plus dO; `--out` names the .npz.
#[derive(Debug, Args)]
#[command(after_help = "\
Computes dL/dQ, dL/dK, dL/dV (and, in Learned mode, dL/dW, dL/db of every level's weights,
summed over batch and heads) for L = sum(dO * O), O = FMA(Q, K, V); dO has the shape of Q.
--out GRADS.npz holds dq, dk, dv (shape of Q) and, in Learned mode, k_w{l}, k_b{l}, v_w{l},
v_b{l} (with --queries coarse also q_w{l}, q_b{l}) for every level of the weights (the layout
of --weights; levels the sequence does not use are zeros). Fine or coarse queries, 1D or
--grid, variable-length batches. float32 on the GPU, float64 with --reference; with
--storage f16, dq, dk, dv as float16 (with learned weights or --sinks, every array float32,
the f16 gradients widened exactly). --lse does not
apply. --dense differentiates exact attention instead (dq, dk, dv; K/V may have fewer heads
and another length than Q, --causal bottom-right aligned as in run; variable-length batches
too).

Exit codes: 0 success, 2 bad input (arguments, files, shapes, weights), 1 GPU or runtime failure.")]
pub struct GradArgs {
    /// Gradient of the loss with respect to the output O, same shape as Q.
    #[arg(long = "dout", value_name = "DO.npy")]
    pub dout: PathBuf,
    /// The options of `run` (--out names the gradients .npz).
    #[command(flatten)]
    pub run: RunArgs,
}

/// Arguments of `multipole-attn decode`: those of `run` plus the prefill and chunk lengths.
#[derive(Debug, Args)]
#[command(after_help = "\
Decodes causally (--causal is implied): the first P tokens go through the causal forward and fill
the cache; the remaining n - P arrive in steps of C tokens per sequence (the last step may be
shorter), each attending to the cache: FMA (near blocks and every level's far list, O(m + p log n)
keys per token) or, with --dense, exact attention over every cached key. O (and --lse) hold all n
rows; row i equals row i of `run --causal` up to float rounding. Prints tokens per second of the
steps. --reference decodes with the f64 CPU mirror instead.

Softmax variants, as `run --causal` with the same flags: --softcap C, --sinks S.npy (heads,),
--window L,0 (R must be 0: decoding is causal). With a window the cache keeps only the last
L + C keys and values per sequence and head (a ring; no coarse level, no history), so its memory
does not grow with the context; FMA and --dense then both run exact windowed attention, and FMA
needs L <= m as `run` does (or --dense).

--storage f16 (adapters with SHADER_F16): the cache's keys and values and each step's Q, K, V, O
are f16 (inputs rounded), sums and softmax f32; O is written as float16 and equals
`run --causal --storage f16` within its f16 bound. With --dense the head dimension must be even.

Exit codes: 0 success, 2 bad input (P > n, C = 0, --queries coarse, weights missing a level
the final length needs, --window with R > 0 or, for FMA, L > m, ...), 1 GPU or runtime failure.")]
pub struct DecodeArgs {
    /// Tokens per sequence prefilled through the causal forward (0 ..= n).
    #[arg(long, value_name = "P")]
    pub prefill: usize,
    /// Tokens appended per step and sequence (>= 1).
    #[arg(long, value_name = "C", default_value_t = 1)]
    pub chunk: usize,
    /// The options of `run`.
    #[command(flatten)]
    pub run: RunArgs,
}
