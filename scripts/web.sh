#!/usr/bin/env bash
# The browser demo: builds the wasm crate (web/), runs wasm-bindgen (the CLI at the version in
# Cargo.lock) into web/pkg/ (JS, TypeScript declarations, package.json: an npm package), and serves web/ on http://127.0.0.1:${PORT:-8000}/ until Ctrl-C.
# `--build-only` stops after the build (the tests use it). Needs a browser with WebGPU.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${SKIP_SETUP:-0}" != 1 ]; then bash scripts/setup.sh && bash scripts/setup_web.sh; fi
source scripts/env.sh

want=$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/[^0-9.]/, ""); print; exit }' Cargo.lock)
have=$(wasm-bindgen --version 2>/dev/null | awk '{ print $2 }' || true)
if [ "$have" != "$want" ]; then
  echo "web.sh: wasm-bindgen $want is needed (found: ${have:-none}); run scripts/setup_web.sh" >&2
  exit 1
fi

echo "== building web/ for wasm32-unknown-unknown (release)"
cargo build --release --target wasm32-unknown-unknown -p multipole-attn-web
wasm-bindgen --target web --typescript --out-dir web/pkg \
  target/wasm32-unknown-unknown/release/multipole_attn_web.wasm
# The npm package's manifest: web/pkg/ is then what `npm pack` / `npm install ./web/pkg`
# take (ES module, its .d.ts, the .wasm it fetches next to itself).
version=$(awk -F'"' '/^version = / { print $2; exit }' web/Cargo.toml)
cat > web/pkg/package.json <<JSON
{
  "name": "multipole-attn-web",
  "version": "$version",
  "description": "Fast Multipole Attention on WebGPU: WGSL compute shaders and their scheduler, compiled from Rust to WebAssembly",
  "license": "MIT OR Apache-2.0",
  "type": "module",
  "main": "multipole_attn_web.js",
  "module": "multipole_attn_web.js",
  "types": "multipole_attn_web.d.ts",
  "exports": {
    ".": {
      "types": "./multipole_attn_web.d.ts",
      "default": "./multipole_attn_web.js"
    },
    "./multipole_attn_web_bg.wasm": "./multipole_attn_web_bg.wasm"
  },
  "files": [
    "multipole_attn_web.js",
    "multipole_attn_web.d.ts",
    "multipole_attn_web_bg.wasm",
    "multipole_attn_web_bg.wasm.d.ts"
  ],
  "sideEffects": false,
  "keywords": ["attention", "webgpu", "wgsl", "transformer", "wasm"]
}
JSON
echo "web/pkg: $(du -h web/pkg/multipole_attn_web_bg.wasm | cut -f1) of wasm, .d.ts and package.json"

if [ "${1:-}" = "--build-only" ]; then exit 0; fi
port="${PORT:-8000}"
echo "== serving web/ on http://127.0.0.1:$port/ (Ctrl-C stops)"
exec python3 -m http.server --bind 127.0.0.1 --directory web "$port"
