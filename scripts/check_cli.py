#!/usr/bin/env python3
"""Cross-check the `multipole-attn run` command-line tool against the independent
float64 reference in fma_reference.py.

Usage:
    python3 scripts/check_cli.py [BIN]

BIN defaults to $MULTIPOLE_ATTN_BIN, else target/release/multipole-attn.
Environment:
    CHECK_REFERENCE=1   run every case both on the GPU path and with --reference
                        (default: GPU only, plus a few --reference cases)
    CHECK_SEED=<int>    reuse a seed (default: a fresh one, printed)
    CHECK_TIMEOUT=<s>   per-invocation timeout in seconds (default 600)

Error metric (for O and for LSE): max|cli - ref| / max(1, max|ref|), where ref is
computed in float64 from exactly the values the CLI read (f32 inputs and f32
weights are widened exactly).  Tolerances:
    GPU path (f32 compute)             2e-5
    --reference, output written as f64 1e-9   (expected ~1e-12)
    --reference, output written as f32 2e-7   (only the final f32 rounding, ~6e-8)
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

TOL_GPU = 2e-5
TOL_REF_F64 = 1e-9
TOL_REF_F32_OUT = 2e-7

REPO = Path(__file__).resolve().parent.parent


def find_bin():
    cand = sys.argv[1] if len(sys.argv) > 1 else os.environ.get(
        "MULTIPOLE_ATTN_BIN", "target/release/multipole-attn")
    p = Path(cand)
    if not p.exists() and not p.is_absolute() and (REPO / p).exists():
        p = REPO / p
    return p


def scaled_err(cli, want):
    cli = np.asarray(cli, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if cli.shape != want.shape:
        return float("inf"), float("inf")
    if not np.all(np.isfinite(cli)):
        return float("inf"), float("inf")
    abs_err = float(np.abs(cli - want).max()) if cli.size else 0.0
    scale = max(1.0, float(np.abs(want).max()) if want.size else 0.0)
    return abs_err, abs_err / scale


def random_weights(rng, d, m, p, L, dtype=np.float32):
    """Random learned weights around the box initialisation, so the far field is not
    trivial: W = box * (1 + 0.5 N(0,1)) + (0.5 / w) N(0,1), bias = 0.1 N(0,1)."""
    out = {}
    for l in range(1, L + 1):
        w = ref.window_size(m, l)
        for t in ("k", "v"):
            box = ref.box_weights(d, p, w)
            W = box * (1.0 + 0.5 * rng.standard_normal(box.shape)) \
                + (0.5 / w) * rng.standard_normal(box.shape)
            out[f"{t}_w{l}"] = W.astype(dtype)
            out[f"{t}_b{l}"] = (0.1 * rng.standard_normal((d, p))).astype(dtype)
    return out


# name, shape (n, d) or (b, h, n, d), m, p, causal, mode, weights ('random'|'default'|None),
# count_correction, input dtype, always-also-reference
CASES = [
    ("n1-d16-m16-p1-bidir-avg", (1, 16), 16, 1, False, "average", None, True, "f32", True),
    ("n1-d40-m64-p2-causal-learned", (1, 40), 64, 2, True, "learned", "default", True, "f32", False),
    ("n97-d16-m16-p1-causal-avg", (97, 16), 16, 1, True, "average", None, True, "f32", False),
    ("n97-d40-m16-p2-bidir-learned", (97, 40), 16, 2, False, "learned", "random", True, "f32", False),
    ("n97-d16-m64-p2-bidir-avg(L=0)", (97, 16), 64, 2, False, "average", None, True, "f32", False),
    ("n97-d40-m16-p1-causal-learned", (97, 40), 16, 1, True, "learned", "random", True, "f32", False),
    ("n1000-d16-m16-p2-causal-avg", (1000, 16), 16, 2, True, "average", None, True, "f32", False),
    ("n1000-d40-m16-p1-bidir-avg", (1000, 40), 16, 1, False, "average", None, True, "f32", False),
    ("n1000-d16-m64-p2-bidir-learned", (1000, 16), 64, 2, False, "learned", "random", True, "f32", False),
    ("n1000-d40-m64-p1-causal-learned", (1000, 40), 64, 1, True, "learned", "random", True, "f32", False),
    ("n1000-d16-m16-p2-bidir-learned-boxinit", (1000, 16), 16, 2, False, "learned", "default", True, "f32", False),
    ("n1025-d16-m16-p2-bidir-avg", (1025, 16), 16, 2, False, "average", None, True, "f32", False),
    ("n1025-d40-m16-p2-causal-learned", (1025, 40), 16, 2, True, "learned", "random", True, "f32", True),
    ("n1025-d16-m64-p1-causal-avg", (1025, 16), 64, 1, True, "average", None, True, "f32", False),
    ("n1025-d40-m64-p2-bidir-learned", (1025, 40), 64, 2, False, "learned", "random", True, "f32", False),
    ("n1024-d16-m16-p2-causal-avg", (1024, 16), 16, 2, True, "average", None, True, "f32", False),
    ("4d-b2h3-n200-d16-m16-p2-causal-learned", (2, 3, 200, 16), 16, 2, True, "learned", "random", True, "f32", True),
    ("4d-b2h3-n97-d40-m16-p1-bidir-avg", (2, 3, 97, 40), 16, 1, False, "average", None, True, "f32", False),
    ("n1000-d16-m16-p2-bidir-avg-no-cc", (1000, 16), 16, 2, False, "average", None, False, "f32", False),
    ("n1000-d40-m16-p2-causal-avg-f64in", (1000, 40), 16, 2, True, "average", None, True, "f64", True),
]


def run_cli(binary, args, timeout):
    proc = subprocess.run([str(binary)] + args, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def negative_control(rng):
    """The check must be able to fail: our FMA vs our dense attention on a random case
    must differ far beyond every tolerance."""
    n, d, m, p = 1000, 16, 16, 2
    q, k, v = (rng.standard_normal((n, d)).astype(np.float32) for _ in range(3))
    ok = True
    for causal in (False, True):
        o, lse = ref.fma_forward(q, k, v, m, p, causal, "average")
        od, ld = ref.dense_attention(q, k, v, causal)
        _, e_o = scaled_err(od, o)
        _, e_l = scaled_err(ld, lse)
        good = e_o > 1e-3 and e_o > 50 * TOL_GPU
        print(f"negative control (dense output judged against FMA ref, causal={causal}): "
              f"O err {e_o:.3e}, LSE err {e_l:.3e} -> {'would FAIL (good)' if good else 'WOULD PASS (bad)'}")
        ok &= good
    return ok


def main():
    binary = find_bin()
    seed = int(os.environ["CHECK_SEED"]) if os.environ.get("CHECK_SEED") else secrets.randbits(63)
    both = os.environ.get("CHECK_REFERENCE", "") == "1"
    timeout = float(os.environ.get("CHECK_TIMEOUT", "600"))
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
        nfail += 1
        print(f"{npass} passed, {nfail} failed")
        return 1

    with tempfile.TemporaryDirectory(prefix="fma_check_") as tmp:
        tmp = Path(tmp)
        for ci, (name, shape, m, p, causal, mode, wkind, cc, dt, also_ref) in enumerate(CASES):
            d = shape[-1]
            n = shape[-2]
            L = ref.num_levels(n, m)
            dtype = np.float32 if dt == "f32" else np.float64
            q, k, v = (rng.standard_normal(shape).astype(dtype) for _ in range(3))
            paths = {}
            for nm, arr in (("q", q), ("k", k), ("v", v)):
                paths[nm] = tmp / f"c{ci}_{nm}.npy"
                np.save(paths[nm], arr)
            args = ["run", "--q", str(paths["q"]), "--k", str(paths["k"]), "--v", str(paths["v"]),
                    "--block", str(m), "--rank", str(p), "--downsample", mode]
            if causal:
                args.append("--causal")
            if not cc:
                args.append("--no-count-correction")
            weights = None
            if mode == "learned" and wkind == "random" and L > 0:
                weights = random_weights(rng, d, m, p, L)
                wpath = tmp / f"c{ci}_w.npz"
                np.savez(wpath, **weights)
                args += ["--weights", str(wpath)]
            # float64 reference from the exact values the CLI reads
            want_o, want_l = ref.fma_forward(q, k, v, m, p, causal, mode, weights, cc)
            # for f64 inputs, also the reference on f32-rounded inputs (in case the tool
            # narrows its inputs)
            alt = None
            if dt == "f64":
                q32, k32, v32 = (x.astype(np.float32) for x in (q, k, v))
                alt = ref.fma_forward(q32, k32, v32, m, p, causal, mode, weights, cc)

            paths_to_run = []
            paths_to_run.append("gpu")
            if both or also_ref:
                paths_to_run.append("reference")
            for path in paths_to_run:
                out = tmp / f"c{ci}_{path}_o.npy"
                lse = tmp / f"c{ci}_{path}_lse.npy"
                for f in (out, lse):
                    if f.exists():
                        f.unlink()
                a = args + ["--out", str(out), "--lse", str(lse)]
                if path == "reference":
                    a.append("--reference")
                label = f"{name} [{path}] L={L}"
                try:
                    rc, text = run_cli(binary, a, timeout)
                except subprocess.TimeoutExpired:
                    rc, text = -1, "timeout"
                if rc != 0 or not out.exists() or not lse.exists():
                    tail = " | ".join(text.splitlines()[-3:])
                    missing = [f.name for f in (out, lse) if not f.exists()]
                    why = f"rc={rc}" + (f", missing {', '.join(missing)}" if missing else "")
                    print(f"{label}: FAIL ({why}; {tail})")
                    nfail += 1
                    continue
                got_o = np.load(out)
                got_l = np.load(lse)
                ae_o, re_o = scaled_err(got_o, want_o)
                ae_l, re_l = scaled_err(got_l, want_l)
                note = ""
                if alt is not None:
                    ae_o2, re_o2 = scaled_err(got_o, alt[0])
                    ae_l2, re_l2 = scaled_err(got_l, alt[1])
                    if max(re_o2, re_l2) < max(re_o, re_l):
                        note = (f" (closer to the ref on f32-ROUNDED inputs: O {re_o2:.2e}, "
                                f"LSE {re_l2:.2e}; vs exact f64 inputs: O {re_o:.2e}, LSE {re_l:.2e})")
                        if path == "reference":
                            # the tool narrowed f64 inputs to f32: judge against that
                            ae_o, re_o, ae_l, re_l = ae_o2, re_o2, ae_l2, re_l2
                if path == "gpu":
                    tol = TOL_GPU
                elif got_o.dtype == np.float64 and got_l.dtype == np.float64:
                    tol = TOL_REF_F64
                else:
                    tol = TOL_REF_F32_OUT
                shape_ok = got_o.shape == q.shape and got_l.shape == q.shape[:-1]
                ok = shape_ok and re_o <= tol and re_l <= tol
                print(f"{label}: O max abs err {ae_o:.3e} max rel err {re_o:.3e}; "
                      f"LSE max abs err {ae_l:.3e} max rel err {re_l:.3e}; tol {tol:.0e} "
                      f"(out {got_o.dtype}{'' if shape_ok else f', BAD SHAPES {got_o.shape} {got_l.shape}'})"
                      f"{note}: {'PASS' if ok else 'FAIL'}")
                if ok:
                    npass += 1
                else:
                    nfail += 1

    print(f"{npass} passed, {nfail} failed")
    return 1 if nfail else 0


if __name__ == "__main__":
    sys.exit(main())
