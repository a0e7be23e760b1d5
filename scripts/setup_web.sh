#!/usr/bin/env bash
# What the browser build needs (scripts/web.sh), on Debian, after scripts/setup.sh: the wasm32
# target, wasm-bindgen-cli at the version in Cargo.lock, and python3 to serve the page. The
# browser tests' Chromium and node packages come from scripts/setup_test.sh. Safe to run
# again: it skips what is present.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
if [ -x "$HOME/.cargo/bin/cargo" ]; then export PATH="$HOME/.cargo/bin:$PATH"; fi

if ! command -v python3 >/dev/null 2>&1; then
  echo "setup_web: apt-get install python3"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3
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
