#!/usr/bin/env python3
"""Independent float64 reference of Fast Multipole Attention (fine queries).

Written only from /work/shared/design/algorithm.md (sections 2-5 and 7).  It is
deliberately NOT a "per-query key list" implementation: for every query block it
builds the full score rows over the concatenation

    X = [K; K~_1; ...; K~_L]          (n + sum_l ceil(n / w_l) * p rows)

and an explicit boolean visibility mask computed from the section-3 rules for
every (query, column) pair, then does an ordinary masked softmax in float64.
Coarse rows whose sub-window is empty are kept in X (so the row index a*p + j of
section 4 is preserved) but are never visible.

Usage:
    python3 fma_reference.py            # runs self_test()
    python3 fma_reference.py --help     # CLI for computing a reference on .npy files
"""

import argparse
import math
import sys

import numpy as np

__all__ = [
    "num_levels",
    "window_size",
    "coarse_layout",
    "visibility_mask",
    "downsample",
    "box_weights",
    "fma_forward",
    "dense_attention",
    "self_test",
]


# --------------------------------------------------------------------------- #
# Geometry (section 2)
# --------------------------------------------------------------------------- #
def _ceil_div(a, b):
    return -(-a // b)


def num_levels(n, m):
    """L: the smallest L >= 0 with ceil(n / (m * 2^L)) <= 2."""
    if n < 1 or m < 1:
        raise ValueError("need n >= 1 and m >= 1")
    L = 0
    while _ceil_div(n, m * (1 << L)) > 2:
        L += 1
    return L


def window_size(m, l):
    """w_l = m * 2^(l-1) for coarse level l >= 1."""
    assert l >= 1
    return m * (1 << (l - 1))


def coarse_layout(n, m, p):
    """Describe every row of the concatenation [K; K~_1; ...; K~_L].

    Returns a dict of int64 arrays of length N = n + sum_l nwin_l * p:
      level  : 0 for fine rows, l for coarse rows
      win    : window index b at that level (fine rows: the token's fine block)
      sub    : j for coarse rows (fine rows: 0)
      start  : first covered token (clipped to [0, n))
      end    : one past the last covered token (clipped); start == end -> empty
      count  : end - start (real token count)
      offset : list, offset[l] = first row of level l in the concatenation
    """
    if m % p != 0:
        raise ValueError("m must be divisible by p (section 2 Decision)")
    L = num_levels(n, m)
    level = [np.zeros(n, np.int64)]
    win = [np.arange(n, dtype=np.int64) // m]
    sub = [np.zeros(n, np.int64)]
    start = [np.arange(n, dtype=np.int64)]
    end = [np.arange(n, dtype=np.int64) + 1]
    offset = [0]
    total = n
    for l in range(1, L + 1):
        w = window_size(m, l)
        sw = w // p
        nwin = _ceil_div(n, w)
        b = np.repeat(np.arange(nwin, dtype=np.int64), p)
        j = np.tile(np.arange(p, dtype=np.int64), nwin)
        s = np.minimum(b * w + j * sw, n)
        e = np.minimum(b * w + (j + 1) * sw, n)
        level.append(np.full(nwin * p, l, np.int64))
        win.append(b)
        sub.append(j)
        start.append(s)
        end.append(e)
        offset.append(total)
        total += nwin * p
    offset.append(total)
    lay = {
        "L": L,
        "level": np.concatenate(level),
        "win": np.concatenate(win),
        "sub": np.concatenate(sub),
        "start": np.concatenate(start),
        "end": np.concatenate(end),
        "offset": offset,
        "n": n,
        "m": m,
        "p": p,
    }
    lay["count"] = lay["end"] - lay["start"]
    return lay


# Far-list offsets (b - a) of section 3, keyed by (causal, parity of a).
_FAR = {
    (False, 0): (-2, 2, 3),
    (False, 1): (-3, -2, 2),
    (True, 0): (-2,),
    (True, 1): (-3, -2),
}


def visibility_mask(lay, rows, causal):
    """Boolean mask (len(rows), N): may query i (in rows) see column c of X?"""
    m = lay["m"]
    rows = np.asarray(rows, dtype=np.int64)[:, None]  # (R, 1)
    level = lay["level"][None, :]
    win = lay["win"][None, :]
    col_start = lay["start"][None, :]
    nonempty = (lay["count"] > 0)[None, :]

    # fine level: the column's block vs the query's block
    a0 = rows // m
    fine_blk = win  # for fine rows 'win' is the fine block of the token
    if causal:
        fine_vis = (fine_blk >= a0 - 1) & (col_start <= rows)  # t <= i (and so block <= a0)
    else:
        fine_vis = np.abs(fine_blk - a0) <= 1
    vis = (level == 0) & fine_vis

    # coarse levels: window offset b - a in the far list for a's parity
    for l in range(1, lay["L"] + 1):
        w = window_size(m, l)
        a = rows // w  # (R, 1)
        diff = win - a  # (R, N); only meaningful where level == l
        in_far = np.zeros(diff.shape, dtype=bool)
        for parity in (0, 1):
            sel = (a % 2) == parity
            hit = np.zeros(diff.shape, dtype=bool)
            for off in _FAR[(bool(causal), parity)]:
                hit |= diff == off
            in_far |= sel & hit
        vis |= (level == l) & in_far & nonempty
    return vis


# --------------------------------------------------------------------------- #
# Downsampling (section 4)
# --------------------------------------------------------------------------- #
def box_weights(d, p, w):
    """Box-average initialisation: W[c, j, t] = p / w if t in sub-window j, else 0."""
    sw = w // p
    W = np.zeros((d, p, w), dtype=np.float64)
    for j in range(p):
        W[:, j, j * sw:(j + 1) * sw] = p / w
    return W


def default_weights(d, m, p, L):
    """Box initialisation for every level (biases 0), keys k_w{l}, k_b{l}, v_w{l}, v_b{l}."""
    out = {}
    for l in range(1, L + 1):
        w = window_size(m, l)
        for t in ("k", "v"):
            out[f"{t}_w{l}"] = box_weights(d, p, w)
            out[f"{t}_b{l}"] = np.zeros((d, p), dtype=np.float64)
    return out


def downsample(x, lay, mode, weights, kind):
    """Coarse rows of every level for tensor x (n, d), kind 'k' or 'v'.

    Returns (N - n, d) float64, rows in concatenation order.  Rows of empty
    sub-windows are filled with zeros (they are never visible).
    """
    n, d = x.shape
    m, p, L = lay["m"], lay["p"], lay["L"]
    blocks = []
    for l in range(1, L + 1):
        w = window_size(m, l)
        nwin = _ceil_div(n, w)
        if mode == "average":
            lo, hi = lay["offset"][l], lay["offset"][l + 1]
            s = lay["start"][lo:hi]
            e = lay["end"][lo:hi]
            out = np.zeros((nwin * p, d))
            for r in range(nwin * p):
                if e[r] > s[r]:
                    out[r] = x[s[r]:e[r]].mean(axis=0)  # divide by the real count
        elif mode == "learned":
            W = np.asarray(weights[f"{kind}_w{l}"], dtype=np.float64)
            B = np.asarray(weights[f"{kind}_b{l}"], dtype=np.float64)
            if W.shape != (d, p, w) or B.shape != (d, p):
                raise ValueError(
                    f"{kind}_w{l}/{kind}_b{l}: expected shapes {(d, p, w)}/{(d, p)}, "
                    f"got {W.shape}/{B.shape}")
            xp = np.zeros((nwin * w, d))
            xp[:n] = x  # tokens beyond n count as zero
            xp = xp.reshape(nwin, w, d)
            # K~[a*p + j, c] = b[c, j] + sum_t W[c, j, t] * x[a*w + t, c]
            out = np.einsum("cjt,atc->ajc", W, xp) + B.T[None, :, :]
            out = out.reshape(nwin * p, d)
        else:
            raise ValueError(f"unknown mode {mode!r}")
        blocks.append(out)
    if not blocks:
        return np.zeros((0, d))
    return np.concatenate(blocks, axis=0)


# --------------------------------------------------------------------------- #
# Forward (section 5)
# --------------------------------------------------------------------------- #
def _fma_2d(q, k, v, m, p, causal, mode, weights, count_correction, softcap=None, sink=None):
    n, d = q.shape
    lay = coarse_layout(n, m, p)
    if mode == "learned" and weights is None:
        weights = default_weights(d, m, p, lay["L"])
    X_k = np.concatenate([k, downsample(k, lay, mode, weights, "k")], axis=0)
    X_v = np.concatenate([v, downsample(v, lay, mode, weights, "v")], axis=0)
    bias = np.zeros(X_k.shape[0])
    if count_correction:
        coarse = (lay["level"] > 0) & (lay["count"] > 0)
        bias[coarse] = np.log(lay["count"][coarse].astype(np.float64))
    scale = 1.0 / math.sqrt(d)
    o = np.zeros((n, d))
    lse = np.zeros(n)
    nblk = _ceil_div(n, m)
    for a0 in range(nblk):
        rows = np.arange(a0 * m, min(n, (a0 + 1) * m))
        vis = visibility_mask(lay, rows, causal)
        s = (q[rows] @ X_k.T) * scale
        if softcap is not None:
            # Logit softcap (issue 30): C tanh(l / C), the count correction added after it.
            s = softcap * np.tanh(s / softcap)
        s = np.where(vis, s + bias[None, :], -np.inf)
        M = s.max(axis=1, keepdims=True)
        if sink is not None:
            # An attention sink: one more term exp(S) in the denominator, with no value.
            M = np.maximum(M, sink)
        E = np.exp(s - M)
        Z = E.sum(axis=1, keepdims=True)
        if sink is not None:
            Z = Z + np.exp(sink - M)
        o[rows] = (E @ X_v) / Z
        lse[rows] = (M + np.log(Z))[:, 0]
    return o, lse


def _check_inputs(q, k, v):
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    if q.shape != k.shape or q.shape != v.shape or q.ndim < 2:
        raise ValueError(f"q, k, v must share a shape (..., n, d): {q.shape} {k.shape} {v.shape}")
    return q, k, v


def fma_forward(q, k, v, m, p, causal=False, mode="average", weights=None,
                count_correction=True, softcap=None, sinks=None):
    """FMA with fine queries.  q, k, v: (n, d) or (..., n, d).  Returns (o, lse)
    with o shaped like q and lse shaped q.shape[:-1], both float64.  softcap: logits become
    C tanh(l / C) (count correction after it); sinks: one logit per head (the second-to-last
    leading axis of (..., heads, n, d), or a scalar for (n, d)) joining every softmax's
    denominator with no value."""
    q, k, v = _check_inputs(q, k, v)
    if mode not in ("average", "learned"):
        raise ValueError(f"mode must be 'average' or 'learned', got {mode!r}")
    if m < 1 or p < 1 or m % p != 0:
        raise ValueError("need m >= 1, p >= 1, m divisible by p")
    if q.ndim == 2:
        sink = None if sinks is None else float(np.asarray(sinks).reshape(-1)[0])
        return _fma_2d(q, k, v, m, p, causal, mode, weights, count_correction, softcap, sink)
    lead = q.shape[:-2]
    o = np.zeros(q.shape)
    lse = np.zeros(q.shape[:-1])
    for idx in np.ndindex(*lead):
        sink = None if sinks is None else float(np.asarray(sinks)[idx[-1]])
        o[idx], lse[idx] = _fma_2d(q[idx], k[idx], v[idx], m, p, causal, mode, weights,
                                   count_correction, softcap, sink)
    return o, lse


def dense_attention(q, k, v, causal=False):
    """Plain softmax attention in float64.  Returns (o, lse)."""
    q, k, v = _check_inputs(q, k, v)
    if q.ndim > 2:
        o = np.zeros(q.shape)
        lse = np.zeros(q.shape[:-1])
        for idx in np.ndindex(*q.shape[:-2]):
            o[idx], lse[idx] = dense_attention(q[idx], k[idx], v[idx], causal)
        return o, lse
    n, d = q.shape
    s = (q @ k.T) / math.sqrt(d)
    if causal:
        s = np.where(np.tril(np.ones((n, n), dtype=bool)), s, -np.inf)
    M = s.max(axis=1, keepdims=True)
    E = np.exp(s - M)
    Z = E.sum(axis=1, keepdims=True)
    return (E @ v) / Z, (M + np.log(Z))[:, 0]


# --------------------------------------------------------------------------- #
# Self test
# --------------------------------------------------------------------------- #
def _coverage(lay, causal, rows=None):
    """For the given query rows: (vis, cov) with cov[r, t] = number of visible
    columns covering token t (difference-array trick, no n x N x n product)."""
    n = lay["n"]
    if rows is None:
        rows = np.arange(n)
    vis = visibility_mask(lay, rows, causal)
    r, c = np.nonzero(vis)
    diff = np.zeros((len(rows), n + 1), dtype=np.int64)
    np.add.at(diff, (r, lay["start"][c]), 1)
    np.add.at(diff, (r, lay["end"][c]), -1)
    return vis, np.cumsum(diff[:, :n], axis=1)


def _far_subwindows(lay, i, causal):
    """Coarse (start, end) sub-windows seen by query i."""
    vis = visibility_mask(lay, [i], causal)[0]
    cols = np.nonzero(vis & (lay["level"] > 0))[0]
    return [(int(lay["start"][c]), int(lay["end"][c])) for c in cols]


def _random_weights(rng, d, m, p, L, spread=0.5):
    W = {}
    for l in range(1, L + 1):
        w = window_size(m, l)
        for t in ("k", "v"):
            box = box_weights(d, p, w)
            W[f"{t}_w{l}"] = box * (1.0 + spread * rng.standard_normal(box.shape)) \
                + (spread / w) * rng.standard_normal(box.shape)
            W[f"{t}_b{l}"] = 0.1 * rng.standard_normal((d, p))
    return W


def self_test(verbose=True):
    rng = np.random.default_rng(12345)
    results = []

    def record(name, ok, detail=""):
        results.append((name, bool(ok)))
        if verbose:
            print(f"[{'PASS' if ok else 'FAIL'}] {name} {detail}")

    # 0. Geometry: section-2 example and section-11 key budget.
    lay = coarse_layout(4096, 64, 2)
    record("L(4096,64)=5 windows 64..1024",
           lay["L"] == 5 and [window_size(64, l) for l in range(1, 6)] == [64, 128, 256, 512, 1024])
    vis, cov = _coverage(lay, causal=False)
    kpq = vis.sum(axis=1)
    record("tiling n=4096 m=64 p=2 bidir", np.all(cov == 1))
    record("keys/query n=4096 m=64 p=2 <= 218 (bound 3m+3pL=222)",
           kpq.max() == 218 and kpq.max() <= 3 * 64 + 3 * 2 * 5, f"max={kpq.max()}")
    record("L(1,m)=0, L(7,4)=0, L(9,4)=1, L(17,4)=2",
           num_levels(1, 16) == 0 and num_levels(7, 4) == 0 and num_levels(9, 4) == 1
           and num_levels(17, 4) == 2)

    # 1. Tiling property.
    cases = [(1, 1, 1), (1, 16, 2), (7, 1, 1), (7, 2, 2), (7, 4, 2), (97, 4, 2), (97, 16, 4),
             (97, 6, 3), (97, 1, 1), (1000, 16, 2), (1000, 64, 4), (1000, 8, 8), (1000, 2, 1),
             (1025, 16, 2), (1024, 16, 2), (1025, 64, 1), (64, 4, 2), (256, 4, 4), (2048, 32, 2)]
    for n, m, p in cases:
        lay = coarse_layout(n, m, p)
        for causal in (False, True):
            vis, cov = _coverage(lay, causal)
            if causal:
                want = np.tril(np.ones((n, n), dtype=np.int64))
            else:
                want = np.ones((n, n), dtype=np.int64)
            ok = np.array_equal(cov, want)
            # no visible empty sub-window, no visible column covering the future
            empty_seen = np.any(vis & (lay["count"] == 0)[None, :])
            ok = ok and not empty_seen
            if causal:
                future = vis & (lay["end"][None, :] - 1 > np.arange(n)[:, None])
                ok = ok and not np.any(future)
            record(f"tiling n={n} m={m} p={p} {'causal' if causal else 'bidir'}", ok,
                   f"L={lay['L']} max keys/query={vis.sum(axis=1).max()}")

    # 2. L = 0 equals dense (both modes, both masks).
    for n, m, p, d in [(1, 16, 2, 8), (7, 16, 1, 5), (7, 4, 2, 6), (32, 16, 4, 16), (20, 16, 2, 3)]:
        assert num_levels(n, m) == 0
        q, k, v = (rng.standard_normal((n, d)) for _ in range(3))
        for causal in (False, True):
            od, ld = dense_attention(q, k, v, causal)
            for mode in ("average", "learned"):
                o, lse = fma_forward(q, k, v, m, p, causal, mode, None)
                err = max(np.abs(o - od).max(), np.abs(lse - ld).max())
                record(f"L=0 == dense n={n} m={m} p={p} {mode} causal={causal}", err < 1e-12,
                       f"err={err:.2e}")

    # 3. Exactness vs dense when K, V are constant on the far sub-windows of a query.
    for n, m, p, d, mode in [(1000, 16, 2, 8, "average"), (97, 4, 2, 6, "average"),
                             (1025, 8, 4, 5, "average"), (1024, 16, 2, 8, "learned"),
                             (512, 8, 1, 4, "learned"), (1000, 4, 4, 7, "average")]:
        lay = coarse_layout(n, m, p)
        for causal in (False, True):
            qs = sorted(set([0, n - 1, n // 2, n // 3, 5 * n // 7, min(n - 1, 3 * m + 1)]))
            worst = 0.0
            worst_nocc = 0.0
            for i in qs:
                q, k, v = (rng.standard_normal((n, d)) for _ in range(3))
                for s0, e0 in _far_subwindows(lay, i, causal):
                    k[s0:e0] = rng.standard_normal(d) * 2.0
                    v[s0:e0] = rng.standard_normal(d)
                od, ld = dense_attention(q, k, v, causal)
                o, lse = fma_forward(q, k, v, m, p, causal, mode, None)
                worst = max(worst, np.abs(o[i] - od[i]).max(), abs(lse[i] - ld[i]))
                o2, _ = fma_forward(q, k, v, m, p, causal, mode, None, count_correction=False)
                worst_nocc = max(worst_nocc, np.abs(o2[i] - od[i]).max())
            record(f"exact vs dense (constant far sub-windows) n={n} m={m} p={p} {mode} "
                   f"causal={causal}", worst < 1e-11, f"err={worst:.2e}")
            if lay["L"] > 0 and not (causal and max(qs) < 2 * m):
                record(f"  ...and without count correction it is NOT exact", worst_nocc > 1e-4,
                       f"err={worst_nocc:.2e}")

    # 4. Learned with box init equals Average on full windows, differs on a partial one.
    q, k, v = (rng.standard_normal((1024, 8)) for _ in range(3))
    for causal in (False, True):
        oa, la = fma_forward(q, k, v, 16, 2, causal, "average")
        ol, ll = fma_forward(q, k, v, 16, 2, causal, "learned", None)
        err = max(np.abs(oa - ol).max(), np.abs(la - ll).max())
        record(f"learned(box) == average, n=1024 m=16 p=2 causal={causal}", err < 1e-12,
               f"err={err:.2e}")
    q, k, v = (rng.standard_normal((1000, 8)) for _ in range(3))
    oa, _ = fma_forward(q, k, v, 16, 2, False, "average")
    ol, _ = fma_forward(q, k, v, 16, 2, False, "learned", None)
    record("learned(box) != average on partial last window, n=1000 bidir",
           np.abs(oa - ol).max() > 1e-6, f"diff={np.abs(oa - ol).max():.2e}")

    # 5. Causal: no leak of the future (random learned weights, partial n).
    for n, m, p in [(1000, 16, 2), (97, 4, 4)]:
        d = 6
        L = num_levels(n, m)
        W = _random_weights(rng, d, m, p, L)
        q, k, v = (rng.standard_normal((n, d)) for _ in range(3))
        worst = 0.0
        for mode in ("average", "learned"):
            o, lse = fma_forward(q, k, v, m, p, True, mode, W)
            for i in (0, m - 1, n // 3, n // 2, n - 2):
                k2, v2 = k.copy(), v.copy()
                k2[i + 1:] = rng.standard_normal(k2[i + 1:].shape)
                v2[i + 1:] = rng.standard_normal(v2[i + 1:].shape)
                o2, l2 = fma_forward(q, k2, v2, m, p, True, mode, W)
                worst = max(worst, np.abs(o2[i] - o[i]).max(), abs(l2[i] - lse[i]))
        record(f"causal no-leak n={n} m={m} p={p} (average + random learned)", worst == 0.0,
               f"err={worst:.2e}")

    # 6. 4-D inputs equal per-head loops; weights are shared by heads.
    n, d, m, p = 97, 5, 8, 2
    W = _random_weights(rng, d, m, p, num_levels(n, m))
    q, k, v = (rng.standard_normal((2, 3, n, d)) for _ in range(3))
    o, lse = fma_forward(q, k, v, m, p, True, "learned", W)
    worst = 0.0
    for b in range(2):
        for h in range(3):
            o1, l1 = fma_forward(q[b, h], k[b, h], v[b, h], m, p, True, "learned", W)
            worst = max(worst, np.abs(o1 - o[b, h]).max(), np.abs(l1 - lse[b, h]).max())
    record("4-D (2,3,n,d) == per-head loop", worst == 0.0 and o.shape == q.shape
           and lse.shape == (2, 3, n))

    # 7. FMA is an approximation: it does differ from dense on random data.
    q, k, v = (rng.standard_normal((1000, 16)) for _ in range(3))
    o, _ = fma_forward(q, k, v, 16, 2, False, "average")
    od, _ = dense_attention(q, k, v, False)
    record("FMA differs from dense on random data (n=1000)", np.abs(o - od).max() > 1e-3,
           f"diff={np.abs(o - od).max():.2e}")

    npass = sum(ok for _, ok in results)
    nfail = len(results) - npass
    print(f"self_test: {npass} passed, {nfail} failed")
    return nfail == 0


# --------------------------------------------------------------------------- #
# CLI
# --------------------------------------------------------------------------- #
def load_weights(path):
    if path is None:
        return None
    with np.load(path) as z:
        return {key: np.asarray(z[key], dtype=np.float64) for key in z.files}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    sub.add_parser("selftest", help="run self_test() (default when no command is given)")
    r = sub.add_parser("run", help="compute the float64 reference on .npy inputs")
    r.add_argument("--q", required=True)
    r.add_argument("--k", required=True)
    r.add_argument("--v", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--lse")
    r.add_argument("--block", type=int, required=True)
    r.add_argument("--rank", type=int, required=True)
    r.add_argument("--causal", action="store_true")
    r.add_argument("--downsample", choices=("average", "learned"), default="average")
    r.add_argument("--weights")
    r.add_argument("--no-count-correction", action="store_true")
    r.add_argument("--dense", action="store_true", help="dense attention instead of FMA")
    args = ap.parse_args(argv)
    if args.cmd in (None, "selftest"):
        return 0 if self_test() else 1
    q, k, v = (np.load(x) for x in (args.q, args.k, args.v))
    if args.dense:
        o, lse = dense_attention(q, k, v, args.causal)
    else:
        o, lse = fma_forward(q, k, v, args.block, args.rank, args.causal, args.downsample,
                             load_weights(args.weights), not args.no_count_correction)
    np.save(args.out, o)
    if args.lse:
        np.save(args.lse, lse)
    return 0


if __name__ == "__main__":
    sys.exit(main())
