#!/usr/bin/env bash
# Our bench (FMA fine queries and dense attention) and burn's WGSL flash-attention kernel
# (../shared/peers/burn-attn, built beforehand: see its README) in one go on the same adapter,
# both timed by the wall clock around the call + a device sync (tensors resident, median after
# a warm-up), and a table of the ratios. Compare only figures of one run: the machine is noisy.
#
#   scripts/bench_peers.sh                      # n = 1024 .. 8192, bidirectional and causal
#   N_MIN=4096 N_MAX=16384 REPS=5 scripts/bench_peers.sh
#   BURN=/path/to/burn-attn/target/release/burn-attn scripts/bench_peers.sh
#   PROFILE=dev scripts/bench_peers.sh          # our bench unoptimised (GPU time dominates)
#
# Writes $OUT/bench.csv (ours), $OUT/burn.csv and prints a markdown table (also $OUT/peers.md).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
N_MIN="${N_MIN:-1024}"
N_MAX="${N_MAX:-8192}"
REPS="${REPS:-3}"
OUT="${OUT:-results/peers}"
BURN="${BURN:-../shared/peers/burn-attn/target/release/burn-attn}"
if [ -z "${SKIP_BURN:-}" ] && [ ! -x "$BURN" ]; then
  echo "no burn-attn binary at $BURN: build it (../shared/peers/README.md) or set BURN" >&2
  exit 1
fi
mkdir -p "$OUT"
ns=()
n="$N_MIN"
while [ "$n" -le "$N_MAX" ]; do ns+=("$n"); n=$((n * 2)); done

# SKIP_OURS=1 / SKIP_BURN=1 reuse the CSV already in $OUT (e.g. when one side had to wait).
if [ -z "${SKIP_OURS:-}" ]; then
  cargo run --profile "${PROFILE:-release}" --example bench -- --n-min "$N_MIN" --n-max "$N_MAX" --causal false,true \
    --reps "$REPS" --clock wall --dense-budget-s 1000 --out "$OUT" >"$OUT/bench.log"
fi
if [ -z "${SKIP_BURN:-}" ]; then
  WGPU_BACKEND=vulkan BURN_ATTN_IMPLS=flash BURN_ATTN_CHECK=0 BURN_ATTN_SKIP_MS=1000000 \
    "$BURN" "${ns[@]}" >"$OUT/burn.csv"
fi

python3 - "$OUT" "$REPS" <<'PY' | tee "$OUT/peers.md"
import csv, sys
out, reps = sys.argv[1], sys.argv[2]
ours = {}
for r in csv.DictReader(open(f"{out}/bench.csv")):
    if r["median_ms"]:
        ours[(r["method"], int(r["n"]), r["causal"] == "true")] = (float(r["median_ms"]), float(r["gflops"]))
burn = {}
for line in open(f"{out}/burn.csv"):
    if line.startswith("burn_flash,"):
        f = line.strip().split(",")
        if f[3]:
            burn[(int(f[2]), f[1] == "causal")] = (float(f[3]), float(f[7]))
adapter = next((l.strip() for l in open(f"{out}/bench.log") if l.startswith("adapter")), "")
kernels = next((l.strip() for l in open(f"{out}/bench.log") if l.startswith("kernels")), "")
print(f"{adapter}; {kernels}; wall clock, d = 64, m = 64, p = 2, 1 head; median of {reps}")
print()
print("| n | mask | FMA fine ms | dense ms | burn flash ms | FMA fine GFLOP/s | dense GFLOP/s | burn flash GFLOP/s | dense / burn (GFLOP/s) | fine / dense (GFLOP/s) |")
print("|---|---|---|---|---|---|---|---|---|---|")
for (n, causal) in sorted(burn):
    fine = ours.get(("fma-fine", n, causal))
    dense = ours.get(("dense", n, causal))
    b = burn[(n, causal)]
    cell = lambda x, i, fmt: (fmt % x[i]) if x else "-"
    ratio = lambda a, c: f"{a[1] / c[1]:.2f}" if a and c else "-"
    print(f"| {n} | {'causal' if causal else 'bidirectional'} | {cell(fine, 0, '%.1f')} | {cell(dense, 0, '%.1f')} | {b[0]:.1f} "
          f"| {cell(fine, 1, '%.2f')} | {cell(dense, 1, '%.2f')} | {b[1]:.2f} | {ratio(dense, b)} | {ratio(fine, dense)} |")
for n in sorted({n for (n, _) in burn}):
    d0, d1 = ours.get(("dense", n, False)), ours.get(("dense", n, True))
    if d0 and d1:
        print(f"\ndense causal speed-up over bidirectional at n = {n}: {d0[0] / d1[0]:.2f}x", end="")
print()
PY
