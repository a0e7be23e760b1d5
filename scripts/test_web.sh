#!/usr/bin/env bash
# The browser build's tests: lints of the wasm crate, the library's WebGPU output against the
# CPU reference inside headless Chromium (wasm-bindgen-test), then the demo page end to end
# (build, serve on 127.0.0.1, playwright-core drives /usr/bin/chromium; screenshots land in
# results/), its "Test this GPU" conformance run, and the README's TypeScript example against
# the generated declarations. Called at the end of scripts/test.sh; run alone after scripts/setup_test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

echo "== web: format and lints (wasm32)"
cargo clippy --target wasm32-unknown-unknown -p multipole-attn-web --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --target wasm32-unknown-unknown -p multipole-attn-web --no-deps --quiet

echo "== web: WebGPU in headless Chromium against the CPU reference (wasm-bindgen-test)"
export CHROMEDRIVER="${CHROMEDRIVER:-/usr/bin/chromedriver}"
# The whole suite runs on SwiftShader (a CPU): give it time.
export WASM_BINDGEN_TEST_TIMEOUT="${WASM_BINDGEN_TEST_TIMEOUT:-400}"
cargo test --target wasm32-unknown-unknown -p multipole-attn-web

echo "== web: the demo page end to end (screenshots in results/)"
SKIP_SETUP=1 bash scripts/web.sh --build-only
(cd web && npm test)
