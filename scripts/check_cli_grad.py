#!/usr/bin/env python3
"""Cross-check `multipole-attn grad` against central finite differences of the independent
float64 forwards in fma_reference.py and, for coarse queries, check_cli_coarse.py (both written
from algorithm.md alone; neither has a backward), and `grad --dense` against those of
`dense_forward` below (exact attention with grouped-query K/V heads and bottom-right causal
alignment, written from the CLI's documented rule).

Usage:
    python3 scripts/check_cli_grad.py [BIN]

BIN defaults to $MULTIPOLE_ATTN_BIN, else target/release/multipole-attn.
Environment: CHECK_SEED=<int> reuses a seed (default: a fresh one, printed).

For L = sum(dO * O(Q, K, V, W)), every gradient array G the CLI writes (dq, dk, dv and, in
Learned mode, k_w{l}, k_b{l}, v_w{l}, v_b{l}, with coarse queries also q_w{l}, q_b{l}; with
--dense only dq, dk, dv) is checked along DIRS random unit directions U
and COORDS random single coordinates:
    err = |<G, U> - (L(X + hU) - L(X - hU)) / 2h| / max(1, |G|)     (h = 1e-5, float64)
The finite difference itself is good to ~1e-9 (O(h^2) truncation, 1e-16 / h rounding).
Tolerances: GPU path (f32) 2e-5 (measured <= 5e-7); --reference path (f64) 1e-7
(measured ~2e-10, the finite difference's own error).
Prints one line per case and a final line `N passed, M failed`; exits 1 if any failed.
"""

import os
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fma_reference as ref  # noqa: E402
from check_cli import find_bin, random_weights  # noqa: E402
from check_cli_coarse import coarse_fma  # noqa: E402

TOL_GPU = 2e-5
TOL_REF = 1e-7
H = 1e-5
DIRS = 3
COORDS = 3

# name, shape, m, p, causal, mode, queries (coarse: (n, d) inputs, bidirectional)
CASES = [
    ("n97-d8-m4-p2-bidir-learned", (97, 8), 4, 2, False, "learned", "fine"),
    ("n61-d5-m4-p1-causal-learned", (61, 5), 4, 1, True, "learned", "fine"),
    ("b2h2-n50-d8-m8-p2-causal-avg", (2, 2, 50, 8), 8, 2, True, "average", "fine"),
    ("n130-d4-m16-p2-bidir-avg", (130, 4), 16, 2, False, "average", "fine"),
    ("n75-d6-m4-p2-coarse-learned", (75, 6), 4, 2, False, "learned", "coarse"),
    ("n90-d4-m8-p1-coarse-avg", (90, 4), 8, 1, False, "average", "coarse"),
]

# --dense: name, Q shape, K/V shape, causal[, --seqlens of a packed batch]
DENSE_CASES = [
    ("dense-n61-d6-bidir", (61, 6), (61, 6), False),
    ("dense-n61-d6-causal", (61, 6), (61, 6), True),
    ("dense-b2h4kv2-n37-d8-causal", (2, 4, 37, 8), (2, 2, 37, 8), True),
    ("dense-b1h3kv1-n50-d5-bidir", (1, 3, 50, 5), (1, 1, 50, 5), False),
    # Cross-length: more keys than queries, and fewer (causal: the first 15 rows see no key).
    ("dense-b1h4kv2-n20-nkv45-d6-bidir", (1, 4, 20, 6), (1, 2, 45, 6), False),
    ("dense-b1h4kv2-n20-nkv45-d6-causal", (1, 4, 20, 6), (1, 2, 45, 6), True),
    ("dense-b2h2-n40-nkv25-d7-causal", (2, 2, 40, 7), (2, 2, 25, 7), True),
    # A packed batch: each sequence attends to itself (one empty).
    ("dense-packed-1,0,17,30-h2kv1-d5-causal", (1, 2, 48, 5), (1, 1, 48, 5), True, (1, 0, 17, 30)),
]


def dense_forward_packed(q, k, v, causal, seqlens):
    """dense_forward of each sequence of a packed (1, h, total, d) batch alone."""
    o = np.zeros(q.shape)
    at = 0
    for n in seqlens:
        rows = slice(at, at + n)
        if n > 0:
            o[:, :, rows] = dense_forward(q[:, :, rows], k[:, :, rows], v[:, :, rows], causal)
        at += n
    return o


def dense_forward(q, k, v, causal):
    """Exact softmax attention in float64, (n, d) or (b, h, n, d) Q with (b, h_kv, n_kv, d) K, V:
    query head j reads K/V head j // (h / h_kv); causal: query i sees key t iff
    t <= i + n_kv - n (bottom-right aligned), a row with no key gives 0."""
    if q.ndim == 2:
        return dense_forward(q[None, None], k[None, None], v[None, None], causal)[0, 0]
    b, h, n, d = q.shape
    hk, nk = k.shape[1], k.shape[2]
    k = np.repeat(k, h // hk, axis=1)
    v = np.repeat(v, h // hk, axis=1)
    s = np.einsum("bhid,bhtd->bhit", q, k) / np.sqrt(d)
    if causal:
        seen = np.arange(nk)[None, :] <= np.arange(n)[:, None] + nk - n
        s = np.where(seen, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(s - m)
    z = e.sum(axis=-1, keepdims=True)
    return np.einsum("bhit,bhtd->bhid", e, v) / np.where(z > 0, z, 1.0)


def loss(q, k, v, dout, m, p, causal, mode, weights, queries="fine"):
    if queries == "coarse":
        o, _ = coarse_fma(q, k, v, m, p, mode, weights)
    else:
        o, _ = ref.fma_forward(q, k, v, m, p, causal, mode, weights)
    return float(np.sum(o * dout))


def check_case(binary, tmp, rng, ci, case):
    name, shape, m, p, causal, mode, queries = case
    d, n = shape[-1], shape[-2]
    L = ref.num_levels(n, m)
    q, k, v, dout = (rng.standard_normal(shape).astype(np.float32) for _ in range(4))
    paths = {}
    for nm, arr in (("q", q), ("k", k), ("v", v), ("dout", dout)):
        paths[nm] = tmp / f"c{ci}_{nm}.npy"
        np.save(paths[nm], arr)
    args = ["grad", "--q", str(paths["q"]), "--k", str(paths["k"]), "--v", str(paths["v"]),
            "--dout", str(paths["dout"]), "--block", str(m), "--rank", str(p),
            "--downsample", mode, "--queries", queries]
    if causal:
        args.append("--causal")
    weights = None
    if mode == "learned" and L > 0:
        weights = random_weights(rng, d, m, p, L)
        if queries == "coarse":
            # The query weights: the key weights' kind of draw, from their own values.
            for l in range(1, L + 1):
                weights[f"q_w{l}"] = (weights[f"k_w{l}"]
                                      * (1.0 + 0.3 * rng.standard_normal(weights[f"k_w{l}"].shape))
                                      ).astype(np.float32)
                weights[f"q_b{l}"] = (0.1 * rng.standard_normal((d, p))).astype(np.float32)
        wpath = tmp / f"c{ci}_w.npz"
        np.savez(wpath, **weights)
        args += ["--weights", str(wpath)]
    # Everything in float64 from exactly the values the CLI reads.
    base = {"q": q.astype(np.float64), "k": k.astype(np.float64), "v": v.astype(np.float64)}
    w64 = None if weights is None else {key: a.astype(np.float64) for key, a in weights.items()}
    do64 = dout.astype(np.float64)

    def f(x, w):
        return loss(x["q"], x["k"], x["v"], do64, m, p, causal, mode, w, queries)

    results = []
    for path, tol in (("gpu", TOL_GPU), ("reference", TOL_REF)):
        out = tmp / f"c{ci}_{path}.npz"
        a = args + ["--out", str(out)] + (["--reference"] if path == "reference" else [])
        proc = subprocess.run([str(binary)] + a, capture_output=True, text=True, timeout=600)
        label = f"{name} [{path}] L={L}"
        if proc.returncode != 0:
            results.append((label, False, f"exit {proc.returncode}: {proc.stderr.strip()}"))
            continue
        grads = dict(np.load(out))
        want = {"dq", "dk", "dv"}
        if mode == "learned":
            kinds = "kvq" if queries == "coarse" else "kv"
            want |= {f"{t}_{kind}{l}" for t in kinds for kind in "wb" for l in range(1, L + 1)}
        if set(grads) != want:
            results.append((label, False, f"keys {sorted(grads)}, expected {sorted(want)}"))
            continue
        worst = 0.0
        for key, g in grads.items():
            g = g.astype(np.float64)
            for trial in range(DIRS + COORDS):
                if trial < DIRS:
                    u = rng.standard_normal(g.shape)
                    u /= np.linalg.norm(u)
                else:
                    u = np.zeros(g.size)
                    u[rng.integers(g.size)] = 1.0
                    u = u.reshape(g.shape)
                if key in ("dq", "dk", "dv"):
                    x = key[1]
                    plus = dict(base, **{x: base[x] + H * u})
                    minus = dict(base, **{x: base[x] - H * u})
                    fd = (f(plus, w64) - f(minus, w64)) / (2 * H)
                else:
                    wp = dict(w64, **{key: w64[key] + H * u})
                    wm = dict(w64, **{key: w64[key] - H * u})
                    fd = (f(base, wp) - f(base, wm)) / (2 * H)
                an = float(np.sum(g * u))
                worst = max(worst, abs(an - fd) / max(1.0, float(np.linalg.norm(g))))
        ok = worst <= tol
        results.append((label, ok, f"worst scaled error {worst:.2e} (tolerance {tol:.0e})"))
    return results


def check_dense_case(binary, tmp, rng, ci, case):
    """grad --dense on both paths against finite differences of dense_forward."""
    name, q_shape, kv_shape, causal = case[:4]
    seqlens = case[4] if len(case) > 4 else None
    q, dout = (rng.standard_normal(q_shape).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal(kv_shape).astype(np.float32) for _ in range(2))
    paths = {}
    for nm, arr in (("q", q), ("k", k), ("v", v), ("dout", dout)):
        paths[nm] = tmp / f"d{ci}_{nm}.npy"
        np.save(paths[nm], arr)
    args = ["grad", "--dense", "--q", str(paths["q"]), "--k", str(paths["k"]),
            "--v", str(paths["v"]), "--dout", str(paths["dout"])]
    if causal:
        args.append("--causal")
    if seqlens is not None:
        args += ["--seqlens", ",".join(map(str, seqlens))]
    base = {"q": q.astype(np.float64), "k": k.astype(np.float64), "v": v.astype(np.float64)}
    do64 = dout.astype(np.float64)

    def f(x):
        if seqlens is not None:
            o = dense_forward_packed(x["q"], x["k"], x["v"], causal, seqlens)
        else:
            o = dense_forward(x["q"], x["k"], x["v"], causal)
        return float(np.sum(o * do64))

    results = []
    for path, tol in (("gpu", TOL_GPU), ("reference", TOL_REF)):
        out = tmp / f"d{ci}_{path}.npz"
        a = args + ["--out", str(out)] + (["--reference"] if path == "reference" else [])
        proc = subprocess.run([str(binary)] + a, capture_output=True, text=True, timeout=600)
        label = f"{name} [{path}]"
        if proc.returncode != 0:
            results.append((label, False, f"exit {proc.returncode}: {proc.stderr.strip()}"))
            continue
        grads = dict(np.load(out))
        if set(grads) != {"dq", "dk", "dv"}:
            results.append((label, False, f"keys {sorted(grads)}, expected dq, dk, dv"))
            continue
        worst = 0.0
        for key, g in grads.items():
            g = g.astype(np.float64)
            x = key[1]
            if g.shape != base[x].shape:
                worst = float("inf")
                break
            for trial in range(DIRS + COORDS):
                if trial < DIRS:
                    u = rng.standard_normal(g.shape)
                    u /= np.linalg.norm(u)
                else:
                    u = np.zeros(g.size)
                    u[rng.integers(g.size)] = 1.0
                    u = u.reshape(g.shape)
                fd = (f(dict(base, **{x: base[x] + H * u}))
                      - f(dict(base, **{x: base[x] - H * u}))) / (2 * H)
                an = float(np.sum(g * u))
                worst = max(worst, abs(an - fd) / max(1.0, float(np.linalg.norm(g))))
        ok = worst <= tol
        results.append((label, ok, f"worst scaled error {worst:.2e} (tolerance {tol:.0e})"))
    return results


def negative_control(rng):
    """The check must be able to fail: a gradient off by 1% along one coordinate."""
    n, d, m, p = 40, 4, 4, 2
    q, k, v, dout = (rng.standard_normal((n, d)) for _ in range(4))
    u = np.zeros((n, d))
    u[5, 1] = 1.0
    fd = (loss(q, k, v + H * u, dout, m, p, False, "average", None)
          - loss(q, k, v - H * u, dout, m, p, False, "average", None)) / (2 * H)
    wrong = 1.01 * fd
    err = abs(wrong - fd) / max(1.0, abs(fd))
    good = err > 10 * TOL_REF
    print(f"negative control (a 1% wrong dV element): error {err:.2e} -> "
          f"{'would FAIL (good)' if good else 'WOULD PASS (bad)'}")
    return good


def main():
    binary = find_bin()
    seed = int(os.environ["CHECK_SEED"]) if os.environ.get("CHECK_SEED") else secrets.randbits(63)
    print(f"binary: {binary}")
    print(f"seed: {seed}  (rerun with CHECK_SEED={seed})")
    rng = np.random.default_rng(seed)
    npass = nfail = 0
    if negative_control(rng):
        npass += 1
    else:
        nfail += 1
    if not binary.exists():
        print(f"binary not found: {binary}")
        print(f"{npass} passed, {nfail + 1} failed")
        return 1
    with tempfile.TemporaryDirectory(prefix="fma_grad_check_") as tmp:
        runs = [(check_case, ci, case) for ci, case in enumerate(CASES)]
        runs += [(check_dense_case, ci, case) for ci, case in enumerate(DENSE_CASES)]
        for check, ci, case in runs:
            for label, ok, msg in check(binary, Path(tmp), rng, ci, case):
                print(f"{'PASS' if ok else 'FAIL'} {label}: {msg}")
                npass += ok
                nfail += not ok
    print(f"{npass} passed, {nfail} failed")
    return 0 if nfail == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
