#!/usr/bin/env bash
# For users with a GPU: the conformance suite (also with dense attention on cooperative
# matrices where offered), then the forward (with each run's time per pass), backward and
# decoding sweeps
# and, where python3 imports torch with CUDA, torch's SDPA (f32 memory-efficient and bf16
# FlashAttention-2) on the same shapes, into one markdown report with ratios:
# $OUT/report.md (default results/gpu/). Uses the adapter wgpu picks (WGPU_BACKEND as you set
# it; the demo's lavapipe default is not applied here).
#
#   bash scripts/gpu_bench.sh                 # builds the release binaries, then runs
#   BIN_DIR=path/to/bins bash scripts/gpu_bench.sh   # prebuilt multipole-attn, bench,
#                                             # bench_backward, bench_decode (a machine without
#                                             # cargo: ../shared/gpu/README.md says how)
# HEADS (8), N_MAX (131072), DECODE_CONTEXTS (4096,65536,1048576) and REPS (5) size the run.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu}
HEADS=${HEADS:-8}
N_MAX=${N_MAX:-131072}
REPS=${REPS:-5}
CONTEXTS=${DECODE_CONTEXTS:-4096,65536,1048576}
mkdir -p "$OUT"
if [ -z "${BIN_DIR:-}" ]; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then export PATH="$HOME/.cargo/bin:$PATH"; fi
  cargo build --release --bin multipole-attn --example bench --example bench_backward \
    --example bench_decode
  BIN=target/release/multipole-attn
  EX=target/release/examples
else
  BIN=$BIN_DIR/multipole-attn
  EX=$BIN_DIR
fi
# The n of the sweeps: powers of two from 1024 to N_MAX.
ns=""; n=1024
while [ "$n" -le "$N_MAX" ]; do ns="${ns:+$ns,}$n"; n=$((n * 2)); done

echo "== info, doctor"
"$BIN" info > "$OUT/info.txt" 2>&1 || true
# doctor exits 1 when a case fails: the report says which, the sweeps still run.
"$BIN" doctor --json > "$OUT/doctor.json" 2> "$OUT/doctor.stderr" || echo "doctor: some case failed (see $OUT/doctor.json)"
# Dense attention on tensor cores (opt-in until this passes; docs/perf.md, change 22).
"$BIN" doctor --cooperative-matrix --json > "$OUT/doctor-coop.json" 2> "$OUT/doctor-coop.stderr" \
  || echo "doctor --cooperative-matrix: some case failed (see $OUT/doctor-coop.json)"
echo "== forward sweep (FMA fine and coarse, dense; $HEADS heads, n = $ns)"
"$EX/bench" --n-min 1024 --n-max "$N_MAX" --heads "$HEADS" --causal false,true --reps "$REPS" \
  --dense-budget-s 2 --per-pass --out "$OUT" | tee "$OUT/bench.txt"
echo "== backward"
"$EX/bench_backward" --n 16384,65536 --queries fine,coarse --causal false,true --reps 3 \
  | tee "$OUT/backward.txt"
echo "== decoding"
"$EX/bench_decode" --contexts "$CONTEXTS" --batch 1,8 --reps "$REPS" --out "$OUT/decode.csv" \
  | tee "$OUT/decode.txt"
if python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "== torch SDPA"
  python3 scripts/torch_sdpa.py "$OUT/torch.csv" "$HEADS" "$ns" | tee "$OUT/torch.txt"
else
  echo "== torch SDPA skipped (python3 cannot import torch with CUDA)"
fi
python3 scripts/gpu_report.py "$OUT" > "$OUT/report.md"
echo "wrote $OUT/report.md"
