#!/usr/bin/env bash
# What the browser build and its tests need, on Debian: Chromium and its WebDriver (headless
# WebGPU on SwiftShader), the wasm32 target, wasm-bindgen-cli at the version in Cargo.lock, and
# the e2e test's node packages (web/package-lock.json). Called by scripts/setup.sh; safe to run
# again: it skips what is present.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
if [ -x "$HOME/.cargo/bin/cargo" ]; then export PATH="$HOME/.cargo/bin:$PATH"; fi

need_apt=()
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need_apt+=(chromium-driver)
command -v npm >/dev/null 2>&1 || need_apt+=(nodejs npm)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup_web: apt-get install ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi

if command -v rustup >/dev/null 2>&1; then
  rustup target list --installed 2>/dev/null | grep -q '^wasm32-unknown-unknown$' \
    || rustup target add wasm32-unknown-unknown
fi

# The CLI must be the exact version of the wasm-bindgen crate the build links.
want=$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/[^0-9.]/, ""); print; exit }' Cargo.lock)
have=$(wasm-bindgen --version 2>/dev/null | awk '{ print $2 }' || true)
if [ "$have" != "$want" ]; then
  echo "setup_web: cargo install wasm-bindgen-cli --version $want (found: ${have:-none})"
  cargo install -q wasm-bindgen-cli --version "$want" --force
fi

if [ ! -d web/node_modules/playwright-core ] || [ web/package-lock.json -nt web/node_modules/.package-lock.json ]; then
  echo "setup_web: npm ci in web/"
  (cd web && npm ci --no-audit --no-fund --silent)
fi
