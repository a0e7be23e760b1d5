// Which attention problem a workgroup or invocation works on, and where that problem's rows
// are: the one place the passes turn a dispatch index into (head, sequence) and rows.
//
// A batch of equal sequences (params.seqs = 0): problem bh of batch_heads, n tokens, rows
// bh * n (K/V: bh / kv_group), coarse rows bh * coarse_rows + level offset.
// A variable-length batch (params.seqs = S > 0; packed as FlashAttention's cu_seqlens, or
// padded): problem (h, s), sequence s with its own n_s tokens, every sequence its own FMA (its
// own windows and partial last window; levels above its own L have at most two windows and so
// empty far lists, so running params.num_levels levels changes nothing). Work is laid out head
// by head, and within a head sequence by sequence: a dispatch index finds its sequence by
// binary search in a prefix table. Rust mirror: `plan::SeqTable`.
//
// The sequence table (u32), sections of S + 1 (prefix sums) or S entries:
//   TOK   [0, S+1)            tokens before sequence s (its real tokens)
//   TILE  [S+1, 2S+2)         query tiles before s (this executor's tiling)
//   QBASE [2S+2, 3S+2)        row of token 0 of head 0 of s in Q, O, the LSE
//   KVBASE[3S+2, 4S+2)        row of token 0 of K/V head 0 of s in K, V
//   KVTOK [4S+2, 5S+3)        keys before sequence s (TOK unless its keys have their own length)
//   ROWS l[5S+3 + l(S+1), ..) coarse rows (windows_l(n_s) p) before s at level index l
// Row of token i of query head h: QBASE[s] + h q_head_stride + i; coarse row r of level
// index l: h coarse_rows + levels[l].row_offset + ROWS_l[s] + r (K~, V~: K/V head h / kv_group).
// Needs from the importer: params and `fn seq_word(i: u32) -> u32`, word i of the table:
// importing `sequences` gives both the table's binding (10) and seq_word; a pass with no
// binding to spare defines seq_word over a copy of the table in one of its scratch buffers
// (params.table_at) and imports this file alone.

struct Problem {
    n: u32,        // tokens of the sequence (its queries)
    n_kv: u32,     // its keys: n, or a length of their own (cross-length, dense attention)
    q_row: u32,    // row of its token 0 in Q, O and the LSE
    kv_row: u32,   // row of its token 0 in K and V
    q_crow: u32,   // first coarse row of its query head (Q~, partial outputs) before level offsets
    kv_crow: u32,  // the same for its K/V head (K~, V~)
    s: u32,        // its sequence (0 for a batch of equal sequences)
    qh: u32,       // its query problem index: bh, or h * S + s
}

// Query heads over which a dispatch's problems run: batch * heads (equal sequences, one
// problem each) or the heads of every sequence (varlen, the sequences inside each head).
fn query_heads() -> u32 {
    return select(params.batch_heads, params.heads, params.seqs > 0u);
}

// Section starts of the table.
fn sec_tok() -> u32 {
    return 0u;
}
fn sec_tile() -> u32 {
    return params.seqs + 1u;
}
fn sec_rows(lvl: u32) -> u32 {
    return 5u * params.seqs + 3u + lvl * (params.seqs + 1u);
}

// The largest s < S with table[base + s] <= u: the sequence holding unit u of a prefix section.
// Empty sequences (equal neighbouring prefixes) are skipped over.
fn seq_search(base: u32, u: u32) -> u32 {
    var lo = 0u;
    var hi = params.seqs - 1u;
    while (lo < hi) {
        let mid = (lo + hi + 1u) / 2u;
        if (seq_word(base + mid) <= u) {
            lo = mid;
        } else {
            hi = mid - 1u;
        }
    }
    return lo;
}

// Query head h (of batch_heads problems when params.seqs = 0) of sequence s.
fn problem(h: u32, s: u32) -> Problem {
    var pr: Problem;
    let kv_h = h / params.kv_group;
    pr.q_crow = h * params.coarse_rows;
    pr.kv_crow = kv_h * params.coarse_rows;
    pr.s = s;
    if (params.seqs == 0u) {
        pr.n = params.n;
        pr.n_kv = params.n_kv;
        pr.q_row = h * params.n;
        pr.kv_row = kv_h * params.n_kv;
        pr.qh = h;
    } else {
        let sq = params.seqs;
        pr.n = seq_word(s + 1u) - seq_word(s);
        pr.n_kv = seq_word(4u * sq + 3u + s) - seq_word(4u * sq + 2u + s);
        pr.q_row = seq_word(2u * sq + 2u + s) + h * params.q_head_stride;
        pr.kv_row = seq_word(3u * sq + 2u + s) + kv_h * params.kv_head_stride;
        pr.qh = h * sq + s;
    }
    return pr;
}

// Rows of level index lvl before sequence s in its head's block (0 without a table).
fn seq_level_row(lvl: u32, s: u32) -> u32 {
    if (params.seqs == 0u) {
        return 0u;
    }
    return seq_word(sec_rows(lvl) + s);
}

// Coarse row r of level index lvl of the head whose block starts at `crow` (pr.q_crow or
// pr.kv_crow), sequence s.
fn coarse_row(crow: u32, lvl: u32, s: u32, r: u32) -> u32 {
    return crow + params.levels[lvl].row_offset + seq_level_row(lvl, s) + r;
}

// Windows of level index lvl in the problem's sequence (2D: its cells; a variable-length batch
// is 1D only).
fn level_windows(pr: Problem, lvl: u32) -> u32 {
    if (params.seqs == 0u) {
        return params.levels[lvl].windows;
    }
    return window_count(pr.n, params.levels[lvl].window);
}

// Unit u of a dispatch laid out as `per_problem` units per problem (equal sequences) or by the
// prefix section at `base` (per head: the section's total; varlen): (query head, sequence,
// unit within the problem), or x = 0xffffffff past the end.
fn locate(u: u32, per_problem: u32, base: u32, heads: u32) -> vec3<u32> {
    if (params.seqs == 0u) {
        if (per_problem == 0u || u >= heads * per_problem) {
            return vec3<u32>(0xffffffffu, 0u, 0u);
        }
        return vec3<u32>(u / per_problem, 0u, u % per_problem);
    }
    let per_head = seq_word(base + params.seqs);
    if (per_head == 0u || u >= heads * per_head) {
        return vec3<u32>(0xffffffffu, 0u, 0u);
    }
    let h = u / per_head;
    let r = u % per_head;
    let s = seq_search(base, r);
    return vec3<u32>(h, s, r - seq_word(base + s));
}
