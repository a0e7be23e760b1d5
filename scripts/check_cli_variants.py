#!/usr/bin/env python3
"""Cross-check the softmax variants of the `multipole-attn` CLI (issue 30: --softcap,
--sinks, --window) against float64 numpy: dense and FMA (fine queries), each variant alone and
combined, causal and not, grouped-query heads; `decode` (prefill, then steps through the
decoding cache) with the same flags, against `run --causal` and the float64 reference; `grad`'s
dq, dk, dv and dsinks against central finite differences of the float64 forward.

Usage:
    python3 scripts/check_cli_variants.py [BIN]   (default target/release/multipole-attn)
Environment: CHECK_SEED=<int> reuses a seed (default: fresh, printed).

Definitions (written here from issue 30's text, no code shared with the tool): the logit
l_ij = q_i . k_j / sqrt(d); with a softcap C it becomes C tanh(l_ij / C) (FMA adds its count
correction ln(tokens) after the cap, in fma_reference.py); a window (L, R) keeps key j for
query i iff i - L <= j <= i + R (bottom-right aligned: i shifted by n_kv - n); a sink S_h adds
exp(S_h) to every row's denominator and nothing to its numerator; the LSE includes it. FMA with
a window is exact windowed attention (its near field, no coarse level): the dense definition.

Error: max|cli - ref| / max(1, max|ref|) over O and the LSE. Tolerance 2e-5 on the GPU (f32),
1e-9 with --reference; decode against `run --causal` (the same path) likewise. Gradients: |cli - fd| / max(1, max|fd|) <= 2e-4 (the backward's f32
tolerance; the f64 central differences are exact to ~1e-8 at step 1e-5), on a few sampled
entries per tensor, and dsinks whole.
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
GRAD_TOL = 2e-4


def dense(q, k, v, causal, softcap=None, sinks=None, window=None):
    """q (b, h, n, d), k, v (b, hk, nk, d), float64 -> O, LSE. A row that sees no key and has
    no sink gets O = 0, LSE = -inf."""
    b, h, n, d = q.shape
    hk, nk = k.shape[1], k.shape[2]
    group = h // hk
    o = np.zeros((b, h, n, d))
    lse = np.full((b, h, n), -np.inf)
    i = np.arange(n)[:, None] + (nk - n)
    j = np.arange(nk)[None, :]
    keep = np.ones((n, nk), dtype=bool)
    if causal:
        keep &= j <= i
    if window is not None:
        left, right = window
        keep &= (j >= i - left) & (j <= i + right)
    for bi in range(b):
        for hi in range(h):
            kk, vv = k[bi, hi // group], v[bi, hi // group]
            s = q[bi, hi] @ kk.T / np.sqrt(d)
            if softcap is not None:
                s = softcap * np.tanh(s / softcap)
            s = np.where(keep, s, -np.inf)
            sink = None if sinks is None else float(sinks[hi])
            for r in range(n):
                row = s[r]
                mx = row.max()
                if sink is not None:
                    mx = max(mx, sink)
                if np.isneginf(mx):
                    continue
                e = np.exp(row - mx)
                z = e.sum() + (np.exp(sink - mx) if sink is not None else 0.0)
                o[bi, hi, r] = e @ vv / z
                lse[bi, hi, r] = mx + np.log(z)
    return o, lse


def fma(q, k, v, causal, m, p, softcap=None, sinks=None, window=None):
    """FMA fine queries (self-attention, K/V heads repeated for their query group)."""
    if window is not None:
        return dense(q, k, v, causal, softcap, sinks, window)
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    return ref.fma_forward(q, k, v, m, p, causal, softcap=softcap, sinks=sinks)


def err(got, want):
    e = 0.0
    for g, w in zip(got, want):
        fin = np.isfinite(w)
        if g.shape != w.shape or not np.array_equal(np.isneginf(g), np.isneginf(w)):
            return float("inf")
        if not np.all(np.isfinite(g[fin])):
            return float("inf")
        if w[fin].size:
            e = max(e, float(np.abs(g[fin] - w[fin]).max()) / max(1.0, float(np.abs(w[fin]).max())))
    return e


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

    with tempfile.TemporaryDirectory(prefix="fma_variants_") as tmp:
        tmp = Path(tmp)

        def save(name, a):
            path = tmp / name
            np.save(path, a)
            return str(path)

        def cli(args):
            proc = subprocess.run([str(binary)] + args, capture_output=True, text=True, timeout=600)
            return proc.returncode, (proc.stdout + proc.stderr).strip()

        def flags_of(causal, softcap, sinks, window):
            f = ["--causal"] if causal else []
            if softcap is not None:
                f += ["--softcap", repr(softcap)]
            if sinks is not None:
                f += ["--sinks", save("s.npy", sinks.astype(np.float32))]
            if window is not None:
                f += ["--window", f"{window[0]},{window[1]}"]
            return f

        f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
        (b, h, hk, n, d, m, p) = (1, 4, 2, 97, 16, 16, 2)
        q, k, v = f32(b, h, n, d), f32(b, hk, n, d), f32(b, hk, n, d)
        qp, kp, vp = save("q.npy", q), save("k.npy", k), save("v.npy", v)
        q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
        sinks = rng.standard_normal(h)
        for causal in (False, True):
            win = (13, 0 if causal else 6)
            cases = [
                ("softcap", 1.5, None, None),
                ("sinks", None, sinks, None),
                ("window", None, None, win),
                ("sinks+window", None, sinks, win),
                ("softcap+window", 2.0, None, win),
                ("softcap+sinks", 3.0, sinks, None),
            ]
            for name, cap, snk, w in cases:
                s32 = None if snk is None else snk.astype(np.float32).astype(np.float64)
                for method in ("dense", "fma"):
                    if method == "dense":
                        want = dense(q64, k64, v64, causal, cap, s32, w)
                        mflags = ["--dense"]
                    else:
                        want = fma(q64, k64, v64, causal, m, p, cap, s32, w)
                        mflags = ["--block", str(m), "--rank", str(p)]
                    for path in ("gpu", "reference"):
                        out, lse = tmp / "o.npy", tmp / "lse.npy"
                        for f in (out, lse):
                            f.unlink(missing_ok=True)
                        args = ["run", "--q", qp, "--k", kp, "--v", vp, "--out", str(out),
                                "--lse", str(lse)] + mflags + flags_of(causal, cap, snk, w)
                        args += ["--reference"] if path == "reference" else []
                        label = f"{method} {name} causal={causal} [{path}]"
                        rc, text = cli(args)
                        if rc != 0:
                            report(label, False, f"rc={rc}: {text.splitlines()[-1:]}")
                            continue
                        got = (np.load(out).astype(np.float64), np.load(lse).astype(np.float64))
                        e = err(got, want)
                        report(label, e <= TOL[path], f"error {e:.2e}, tol {TOL[path]:.0e}")

        # decode: the prefill's rows, then steps of 3 tokens through the cache (a window's ring
        # wraps many times), equal to `run --causal` with the same flags and to float64.
        win = (13, 0)
        for name, cap, snk, w in [
            ("softcap", 1.5, None, None),
            ("sinks", None, sinks, None),
            ("window", None, None, win),
            ("sinks+window", None, sinks, win),
            ("softcap+window", 2.0, None, win),
            ("softcap+sinks", 2.5, sinks, None),
            ("softcap+sinks+window", 3.0, sinks, win),
        ]:
            s32 = None if snk is None else snk.astype(np.float32).astype(np.float64)
            for method in ("dense", "fma"):
                if method == "dense":
                    want = dense(q64, k64, v64, True, cap, s32, w)
                    mflags = ["--dense"]
                else:
                    want = fma(q64, k64, v64, True, m, p, cap, s32, w)
                    mflags = ["--block", str(m), "--rank", str(p)]
                for path in ("gpu", "reference"):
                    got = {}
                    for cmd in ("run", "decode"):
                        out, lse = tmp / f"{cmd}_o.npy", tmp / f"{cmd}_lse.npy"
                        for f in (out, lse):
                            f.unlink(missing_ok=True)
                        args = [cmd, "--q", qp, "--k", kp, "--v", vp, "--out", str(out),
                                "--lse", str(lse)] + mflags + flags_of(False, cap, snk, w)
                        args += ["--causal"] if cmd == "run" else ["--prefill", "30", "--chunk", "3"]
                        args += ["--reference"] if path == "reference" else []
                        rc, text = cli(args)
                        if rc != 0:
                            got = None
                            report(f"decode {method} {name} [{path}]", False,
                                   f"{cmd} rc={rc}: {text.splitlines()[-1:]}")
                            break
                        got[cmd] = (np.load(out).astype(np.float64), np.load(lse).astype(np.float64))
                    if got is None:
                        continue
                    e_ref, e_run = err(got["decode"], want), err(got["decode"], got["run"])
                    report(f"decode {method} {name} [{path}]",
                           max(e_ref, e_run) <= TOL[path],
                           f"error {e_ref:.2e} vs float64, {e_run:.2e} vs run --causal, "
                           f"tol {TOL[path]:.0e}")
        # FMA's window is its near field (L <= m), in decode as in run: exit 2; dense takes it.
        for mflags, want_rc in ((["--block", str(m), "--rank", str(p)], 2), (["--dense"], 0)):
            rc, text = cli(["decode", "--q", qp, "--k", kp, "--v", vp, "--out", str(tmp / "w.npy"),
                            "--prefill", "5", "--window", f"{m + 1},0"] + mflags)
            report(f"decode --window {m + 1},0 {' '.join(mflags)}", rc == want_rc,
                   f"rc={rc} (want {want_rc}): {text.splitlines()[-1:] if rc else 'ok'}")

        # Gradients by central differences of the float64 forward: L = sum(dO * O).
        (b, h, hk, n, d) = (1, 2, 1, 23, 8)
        q, k, v, do = f32(b, h, n, d), f32(b, hk, n, d), f32(b, hk, n, d), f32(b, h, n, d)
        paths = [save(f"{t}.npy", a) for t, a in (("gq", q), ("gk", k), ("gv", v), ("gdo", do))]
        x64 = [a.astype(np.float64) for a in (q, k, v)]
        do64 = do.astype(np.float64)
        sinks = rng.standard_normal(h).astype(np.float32).astype(np.float64)
        for name, method, causal, cap, snk, w in [
            ("dense softcap+sinks", "dense", True, 1.5, sinks, None),
            ("dense sinks+window", "dense", False, None, sinks, (5, 3)),
            ("fma softcap+sinks", "fma", True, 2.0, sinks, None),
            ("fma sinks+window", "fma", True, None, sinks, (6, 0)),
        ]:
            def loss(xs, s=snk):
                f = dense if method == "dense" else (lambda *a: fma(*a[:4], 8, 2, *a[4:]))
                o, _ = f(xs[0], xs[1], xs[2], causal, cap, s, w)
                return float((o * do64).sum())

            out = tmp / "g.npz"
            mflags = ["--dense"] if method == "dense" else ["--block", "8", "--rank", "2"]
            args = ["grad", "--q", paths[0], "--k", paths[1], "--v", paths[2], "--dout", paths[3],
                    "--out", str(out)] + mflags + flags_of(causal, cap, snk, w)
            rc, text = cli(args)
            if rc != 0:
                report(f"grad {name}", False, f"rc={rc}: {text.splitlines()[-1:]}")
                continue
            g = np.load(out)
            h_ = 1e-5
            worst = 0.0
            for t, key in enumerate(("dq", "dk", "dv")):
                got = g[key].astype(np.float64)
                flat = rng.choice(got.size, size=min(6, got.size), replace=False)
                fd = []
                for idx in flat:
                    xs_p = [a.copy() for a in x64]
                    xs_m = [a.copy() for a in x64]
                    xs_p[t].flat[idx] += h_
                    xs_m[t].flat[idx] -= h_
                    fd.append((loss(xs_p) - loss(xs_m)) / (2 * h_))
                fd = np.array(fd)
                worst = max(worst, float(np.abs(got.flat[flat] - fd).max()) / max(1.0, float(np.abs(fd).max())))
            if "dsinks" not in g:
                report(f"grad {name}", False, "no dsinks in the .npz")
                continue
            fd = []
            for hi in range(h):
                sp, sm = sinks.copy(), sinks.copy()
                sp[hi] += h_
                sm[hi] -= h_
                fd.append((loss(x64, sp) - loss(x64, sm)) / (2 * h_))
            fd = np.array(fd)
            got = g["dsinks"].astype(np.float64)
            worst = max(worst, float(np.abs(got - fd).max()) / max(1.0, float(np.abs(fd).max())))
            report(f"grad {name} (dq, dk, dv sampled; dsinks)", worst <= GRAD_TOL,
                   f"worst scaled error {worst:.2e}, tol {GRAD_TOL:.0e}")

    print(f"{npass} passed, {nfail} failed")
    return 0 if nfail == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
