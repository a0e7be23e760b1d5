#!/usr/bin/env bash
# Installs everything multipole-attn needs on a fresh Debian machine: a Vulkan driver that runs
# on the CPU (Mesa's lavapipe) and its loader, the Rust toolchain pieces the checks use, and
# numpy for the independent float64 cross-check. Safe to run again: it skips what is present.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

need_apt=()
dpkg -s mesa-vulkan-drivers >/dev/null 2>&1 || need_apt+=(mesa-vulkan-drivers)
dpkg -s libvulkan1 >/dev/null 2>&1 || need_apt+=(libvulkan1)
# wgpu's GL backend on llvmpipe, the second software adapter `multipole-attn doctor` checks.
dpkg -s libegl1 >/dev/null 2>&1 || need_apt+=(libegl1)
dpkg -s libegl-mesa0 >/dev/null 2>&1 || need_apt+=(libegl-mesa0)
dpkg -s libgl1-mesa-dri >/dev/null 2>&1 || need_apt+=(libgl1-mesa-dri)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3 python3-pip)
command -v curl >/dev/null 2>&1 || need_apt+=(curl ca-certificates)
command -v cc >/dev/null 2>&1 || need_apt+=(gcc libc6-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: apt-get install ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    echo "setup: installing Rust with rustup"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
fi
if command -v rustup >/dev/null 2>&1; then
  rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
fi

if ! python3 -c 'import numpy' >/dev/null 2>&1; then
  echo "setup: installing numpy"
  python3 -m pip install -q -r "$(dirname "$0")/requirements.txt" \
    || python3 -m pip install -q --break-system-packages -r "$(dirname "$0")/requirements.txt" \
    || { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-numpy; }
fi

# The browser build (web/): Chromium, the wasm32 target, wasm-bindgen-cli, node packages.
bash "$(dirname "$0")/setup_web.sh"
