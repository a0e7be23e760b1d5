#!/usr/bin/env bash
# Every test: set up (scripts/setup_test.sh), then formatting, lints and docs, the Rust test suite (CPU reference, GPU
# passes against it on the default adapter, CLI), and the CLI against the independent float64
# numpy implementation of algorithm.md. Under CI=true a missing GPU adapter fails the GPU tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_test.sh
source scripts/env.sh

echo "== format, lints, docs"
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --quiet

echo "== the library without the CLI's dependencies (feature cli; web/ depends on it so)"
cli_only='^(clap|ndarray|ndarray-npy|env_logger|indicatif|zip) '
for pkg in multipole-attn multipole-attn-web; do
  flags=(); [ "$pkg" = multipole-attn ] && flags=(--no-default-features)
  if cargo tree -p "$pkg" "${flags[@]}" -e normal --prefix none | grep -E "$cli_only"; then
    echo "error: $pkg pulls in a CLI-only dependency (above)"; exit 1
  fi
done

echo "== cargo test (WGPU_BACKEND=$WGPU_BACKEND)"
cargo test --all-targets
cargo test --doc

echo "== CLI against the independent float64 reference (scripts/fma_reference.py)"
python3 scripts/fma_reference.py
cargo build --release --bin multipole-attn
python3 scripts/check_cli.py target/release/multipole-attn
python3 scripts/check_cli_grad.py target/release/multipole-attn
python3 scripts/check_cli_coarse.py target/release/multipole-attn
python3 scripts/check_cli_cross.py target/release/multipole-attn
python3 scripts/check_cli_variants.py target/release/multipole-attn
python3 scripts/check_cli_f16.py target/release/multipole-attn

echo "== conformance suite on every adapter (Vulkan lavapipe and GL llvmpipe here)"
# The GL adapter needs EGL and Mesa's DRI driver (scripts/setup_test.sh installs them). The
# report as JSON (--json, the document the page's "Test this GPU" copies), checked and printed
# as a table by check_doctor_json.py; doctor's stderr must stay free of "error" lines.
mkdir -p results
target/release/multipole-attn doctor --require vulkan,gl --json >results/doctor.json 2>results/doctor.stderr \
  || { cat results/doctor.stderr results/doctor.json; exit 1; }
python3 scripts/check_doctor_json.py results/doctor.json results/doctor.stderr vulkan,gl

bash scripts/test_web.sh

