#!/usr/bin/env python3
"""Cross-check model-shaped inputs of the `multipole-attn` CLI against float64 numpy:
cross-length attention (K, V longer or shorter than Q; bottom-right causal alignment; FMA's
gradients by finite differences),
grouped-query K/V heads in `run` and `decode` (against the same float64 definitions), empty
sequences in `--seqlens` and per-sequence key lengths (`--seqlens-kv`), and
np.savez_compressed weights.

Usage:
    python3 scripts/check_cli_cross.py [BIN]      (default target/release/multipole-attn)
Environment: CHECK_SEED=<int> reuses a seed (default: fresh, printed).

Dense attention is computed here from its definition (no shared code with the tool):
query i of n sees key j of n_kv iff causal is off or j <= i + n_kv - n; a row that sees
no key has O = 0 and LSE = -inf. FMA with more keys than queries (causal, fine queries)
is defined as the last n rows of a causal FMA over n_kv tokens, computed with
fma_reference.py (the independent float64 FMA) on Q padded with zero rows in front.

Error: max|cli - ref| / max(1, max|ref|) over O and the finite LSE entries (the -inf
entries must match exactly). Tolerance 2e-5 on the GPU (f32), 1e-9 with --reference.
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

TOL = {"gpu": 2e-5, "reference": 1e-9}


def dense(q, k, v, causal):
    """q (b, h, n, d), k, v (b, hk, nk, d), float64; GQA: query head h reads h // (h / hk)."""
    b, h, n, d = q.shape
    hk, nk = k.shape[1], k.shape[2]
    group = h // hk
    o = np.zeros((b, h, n, d))
    lse = np.full((b, h, n), -np.inf)
    for bi in range(b):
        for hi in range(h):
            kk, vv = k[bi, hi // group], v[bi, hi // group]
            s = q[bi, hi] @ kk.T / np.sqrt(d)
            if causal:
                i = np.arange(n)[:, None]
                j = np.arange(nk)[None, :]
                s = np.where(j <= i + nk - n, s, -np.inf)
            for i in range(n):
                row = s[i]
                if np.all(np.isneginf(row)):
                    continue
                mx = row.max()
                e = np.exp(row - mx)
                o[bi, hi, i] = e @ vv / e.sum()
                lse[bi, hi, i] = mx + np.log(e.sum())
    return o, lse


def fma_cross(q, k, v, m, p, weights=None):
    """Causal FMA of q (n, d) as the last n of n_kv = len(k) positions."""
    n, nk = q.shape[0], k.shape[0]
    full = np.zeros((nk, q.shape[1]), dtype=np.float64)
    full[nk - n:] = q
    o, lse = ref.fma_forward(full, k, v, m, p, True, "learned" if weights else "average", weights)
    return o[nk - n:], lse[nk - n:]


def err(got_o, got_l, want_o, want_l):
    if got_o.shape != want_o.shape or got_l.shape != want_l.shape:
        return float("inf"), f"shapes {got_o.shape} {got_l.shape}, want {want_o.shape} {want_l.shape}"
    if not np.array_equal(np.isneginf(got_l), np.isneginf(want_l)):
        return float("inf"), "-inf LSE rows differ"
    fin = np.isfinite(want_l)
    if not np.all(np.isfinite(got_o)) or not np.all(np.isfinite(got_l[fin])):
        return float("inf"), "non-finite output"
    e = 0.0
    for g, w in ((got_o, want_o), (got_l[fin], want_l[fin])):
        if w.size:
            e = max(e, float(np.abs(g - w).max()) / max(1.0, float(np.abs(w).max())))
    return e, ""


def main():
    binary = Path(sys.argv[1] if len(sys.argv) > 1 else "target/release/multipole-attn")
    seed = int(os.environ["CHECK_SEED"]) if os.environ.get("CHECK_SEED") else secrets.randbits(63)
    print(f"binary: {binary}\nseed: {seed}  (rerun with CHECK_SEED={seed})")
    rng = np.random.default_rng(seed)
    npass = nfail = 0

    def report(label, ok, detail):
        nonlocal npass, nfail
        print(f"{label}: {detail}: {'PASS' if ok else 'FAIL'}")
        npass, nfail = npass + ok, nfail + (not ok)

    with tempfile.TemporaryDirectory(prefix="fma_cross_") as tmp:
        tmp = Path(tmp)

        def save(name, a):
            path = tmp / name
            np.save(path, a)
            return str(path)

        def cli(args):
            proc = subprocess.run([str(binary)] + args, capture_output=True, text=True, timeout=600)
            return proc.returncode, (proc.stdout + proc.stderr).strip()

        def run_case(label, q, k, v, flags, want, cmd="run", paths=("gpu", "reference")):
            qp, kp, vp = save("q.npy", q), save("k.npy", k), save("v.npy", v)
            for path in paths:
                out, lse = tmp / "o.npy", tmp / "lse.npy"
                for f in (out, lse):
                    f.unlink(missing_ok=True)
                args = [cmd, "--q", qp, "--k", kp, "--v", vp, "--out", str(out), "--lse", str(lse)]
                args += flags + (["--reference"] if path == "reference" else [])
                rc, text = cli(args)
                if rc != 0:
                    report(f"{label} [{path}]", False, f"rc={rc}: {text.splitlines()[-1:]}")
                    continue
                e, why = err(np.load(out).astype(np.float64), np.load(lse).astype(np.float64), *want)
                report(f"{label} [{path}]", e <= TOL[path], why or f"error {e:.2e}, tol {TOL[path]:.0e}")

        f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
        w64 = lambda *xs: [x.astype(np.float64) for x in xs]  # noqa: E731

        # Dense, cross-length and grouped heads, both alignments of the causal mask.
        for (b, h, n, hk, nk, d, causal) in [
            (2, 4, 37, 2, 100, 16, False),
            (2, 4, 37, 2, 100, 16, True),
            (1, 2, 100, 1, 37, 16, True),   # more queries than keys: 63 rows see no key
            (1, 3, 97, 3, 1, 24, False),
            (1, 1, 1, 1, 1025, 32, True),   # one new token against a cache
        ]:
            q, k, v = f32(b, h, n, d), f32(b, hk, nk, d), f32(b, hk, nk, d)
            flags = ["--dense"] + (["--causal"] if causal else [])
            label = f"dense q({b},{h},{n},{d}) kv({b},{hk},{nk},{d}) causal={causal}"
            run_case(label, q, k, v, flags, dense(*w64(q, k, v), causal))

        # FMA: a chunk of n queries at the end of n_kv causal positions.
        for (n, nk, d, m, p, learned) in [(97, 300, 16, 16, 2, False), (1, 1025, 16, 16, 2, False),
                                          (200, 1000, 24, 16, 1, True)]:
            q, k, v = f32(n, d), f32(nk, d), f32(nk, d)
            flags = ["--causal", "--block", str(m), "--rank", str(p)]
            weights = None
            if learned:
                L = ref.num_levels(nk, m)
                weights = {}
                for l in range(1, L + 1):
                    w = ref.window_size(m, l)
                    for t in ("k", "v"):
                        box = ref.box_weights(d, p, w)
                        weights[f"{t}_w{l}"] = (box * (1 + 0.5 * rng.standard_normal(box.shape))).astype(np.float32)
                        weights[f"{t}_b{l}"] = (0.1 * rng.standard_normal((d, p))).astype(np.float32)
                wpath = tmp / "w.npz"
                np.savez_compressed(wpath, **weights)  # deflate: the archives users save
                flags += ["--weights", str(wpath)]
            want = fma_cross(*w64(q, k, v), m, p, weights)
            run_case(f"FMA causal chunk n={n} of n_kv={nk} d={d} m={m} p={p} learned={learned}",
                     q, k, v, flags, want)

        # Gradients of a causal FMA chunk: central finite differences (h = 1e-5, float64) of
        # L = sum(dO * O) along 3 random unit directions per array, as check_cli_grad.py.
        n, nk, d, m, p = 20, 61, 5, 4, 2
        q, k, v, do = f32(n, d), f32(nk, d), f32(nk, d), f32(n, d)
        paths = [save(f"{x}.npy", a) for x, a in (("q", q), ("k", k), ("v", v), ("do", do))]
        x64 = dict(zip("qkv", w64(q, k, v)))
        do64 = do.astype(np.float64)

        def loss(x):
            return float(np.sum(fma_cross(x["q"], x["k"], x["v"], m, p)[0] * do64))

        for path, tol in (("gpu", 2e-5), ("reference", 1e-7)):
            out = tmp / "g.npz"
            out.unlink(missing_ok=True)
            args = ["grad", "--q", paths[0], "--k", paths[1], "--v", paths[2], "--dout", paths[3],
                    "--causal", "--block", str(m), "--rank", str(p), "--out", str(out)]
            rc, text = cli(args + (["--reference"] if path == "reference" else []))
            label = f"FMA causal chunk gradients n={n} of n_kv={nk} [{path}]"
            if rc != 0:
                report(label, False, f"rc={rc}: {text.splitlines()[-1:]}")
                continue
            g = dict(np.load(out))
            worst, h = 0.0, 1e-5
            for x in "qkv":
                grad = g[f"d{x}"].astype(np.float64)
                for _ in range(3):
                    u = rng.standard_normal(grad.shape)
                    u /= np.linalg.norm(u)
                    fd = (loss(dict(x64, **{x: x64[x] + h * u}))
                          - loss(dict(x64, **{x: x64[x] - h * u}))) / (2 * h)
                    worst = max(worst, abs(float(np.sum(grad * u)) - fd) / max(1.0, np.linalg.norm(grad)))
            shapes_ok = g["dq"].shape == q.shape and g["dk"].shape == k.shape
            report(label, shapes_ok and worst <= tol, f"worst scaled error {worst:.2e}, tol {tol:.0e}")

        # Decoding with grouped-query K/V heads (the cache holds K/V heads only): FMA against
        # the causal float64 FMA of each query head with its K/V head, dense against causal
        # dense attention; prefill 50, then steps of 3 tokens.
        b, h, hk, n, d, m, p = 2, 4, 2, 133, 16, 16, 2
        q, k, v = f32(b, h, n, d), f32(b, hk, n, d), f32(b, hk, n, d)
        q64, k64, v64 = w64(q, k, v)
        want_fma = [np.zeros((b, h, n, d)), np.zeros((b, h, n))]
        for bi in range(b):
            for hi in range(h):
                o, lse = ref.fma_forward(q64[bi, hi], k64[bi, hi // (h // hk)], v64[bi, hi // (h // hk)],
                                         m, p, True, "average")
                want_fma[0][bi, hi], want_fma[1][bi, hi] = o, lse
        decode = ["--prefill", "50", "--chunk", "3"]
        run_case(f"decode FMA q({b},{h},{n},{d}) kv({b},{hk},{n},{d})", q, k, v,
                 decode + ["--block", str(m), "--rank", str(p)], want_fma, cmd="decode")
        run_case(f"decode dense q({b},{h},{n},{d}) kv({b},{hk},{n},{d})", q, k, v, decode + ["--dense"],
                 dense(q64, k64, v64, True), cmd="decode")

        # --seqlens-kv: packed sequences whose keys have lengths of their own (cu_seqlens_q,
        # cu_seqlens_k), empty queries and keys among them; each sequence against its own keys.
        qlens, kvlens = [5, 0, 17, 3, 0], [9, 4, 17, 0, 0]
        h, hk, d = 4, 2, 8
        q, k, v = f32(1, h, sum(qlens), d), f32(1, hk, sum(kvlens), d), f32(1, hk, sum(kvlens), d)
        q64, k64, v64 = w64(q, k, v)
        for causal in (False, True):
            want = [np.zeros(q.shape), np.full(q.shape[:-1], -np.inf)]
            qa = ka = 0
            for nq, nk in zip(qlens, kvlens):
                if nq and nk:
                    o, lse = dense(q64[:, :, qa:qa + nq], k64[:, :, ka:ka + nk], v64[:, :, ka:ka + nk], causal)
                    want[0][:, :, qa:qa + nq], want[1][:, :, qa:qa + nq] = o, lse
                qa, ka = qa + nq, ka + nk
            flags = ["--dense", "--seqlens", ",".join(map(str, qlens)),
                     "--seqlens-kv", ",".join(map(str, kvlens))] + (["--causal"] if causal else [])
            run_case(f"dense --seqlens {qlens} --seqlens-kv {kvlens} causal={causal}", q, k, v, flags, want)
        # FMA: causal, every sequence with at least as many keys as queries.
        qlens, kvlens, m, p = [20, 1, 0, 64], [70, 1, 30, 64], 8, 2
        q, k, v = f32(1, 2, sum(qlens), d), f32(1, 2, sum(kvlens), d), f32(1, 2, sum(kvlens), d)
        q64, k64, v64 = w64(q, k, v)
        want = [np.zeros(q.shape), np.full(q.shape[:-1], -np.inf)]
        qa = ka = 0
        for nq, nk in zip(qlens, kvlens):
            for hi in range(2):
                if nq:
                    o, lse = fma_cross(q64[0, hi, qa:qa + nq], k64[0, hi, ka:ka + nk], v64[0, hi, ka:ka + nk], m, p)
                    want[0][0, hi, qa:qa + nq], want[1][0, hi, qa:qa + nq] = o, lse
            qa, ka = qa + nq, ka + nk
        flags = ["--causal", "--block", str(m), "--rank", str(p), "--seqlens", ",".join(map(str, qlens)),
                 "--seqlens-kv", ",".join(map(str, kvlens))]
        run_case(f"FMA causal --seqlens {qlens} --seqlens-kv {kvlens}", q, k, v, flags, want)

        # FMA refuses what has no FMA meaning, with exit 2.
        q, k, v = f32(50, 8), f32(80, 8), f32(80, 8)
        qp, kp, vp = save("q.npy", q), save("k.npy", k), save("v.npy", v)
        rc, text = cli(["run", "--q", qp, "--k", kp, "--v", vp, "--out", str(tmp / "o.npy")])
        report("FMA bidirectional cross-length refused", rc == 2 and "dense attention takes any lengths" in text,
               f"rc={rc}")

        # Empty sequences in a packed batch change nothing.
        q, k, v = f32(1, 2, 60, 8), f32(1, 2, 60, 8), f32(1, 2, 60, 8)
        qp, kp, vp = save("q.npy", q), save("k.npy", k), save("v.npy", v)
        outs = []
        for lens in ("0,13,0,47,0", "13,47"):
            out = tmp / f"o_{len(outs)}.npy"
            rc, text = cli(["run", "--q", qp, "--k", kp, "--v", vp, "--out", str(out),
                            "--block", "8", "--seqlens", lens])
            outs.append(np.load(out) if rc == 0 else None)
        same = all(o is not None for o in outs) and np.array_equal(outs[0], outs[1])
        report("--seqlens 0,13,0,47,0 equals 13,47 bit for bit", same, "compared")

    print(f"{npass} passed, {nfail} failed")
    return 1 if nfail else 0


if __name__ == "__main__":
    sys.exit(main())
