#!/usr/bin/env bash
# Everything the tests need (scripts/test.sh): the demo's set-up (scripts/setup.sh), then
# rustfmt and clippy, wgpu's GL backend on llvmpipe (the second software adapter
# `multipole-attn doctor` checks), numpy for the independent float64 cross-check, the browser
# build (scripts/setup_web.sh), and the browser tests' Chromium, its WebDriver and node packages
# (web/package-lock.json: playwright-core, typescript). Safe to run again: it skips what is
# present.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
if [ -x "$HOME/.cargo/bin/cargo" ]; then export PATH="$HOME/.cargo/bin:$PATH"; fi

need_apt=()
dpkg -s libegl1 >/dev/null 2>&1 || need_apt+=(libegl1)
dpkg -s libegl-mesa0 >/dev/null 2>&1 || need_apt+=(libegl-mesa0)
dpkg -s libgl1-mesa-dri >/dev/null 2>&1 || need_apt+=(libgl1-mesa-dri)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3 python3-pip)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need_apt+=(chromium-driver)
command -v npm >/dev/null 2>&1 || need_apt+=(nodejs npm)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup_test: apt-get install ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi

if command -v rustup >/dev/null 2>&1; then
  rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
fi

if ! python3 -c 'import numpy' >/dev/null 2>&1; then
  echo "setup_test: installing numpy"
  python3 -m pip install -q -r scripts/requirements.txt \
    || python3 -m pip install -q --break-system-packages -r scripts/requirements.txt \
    || { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-numpy; }
fi

bash scripts/setup_web.sh

if [ ! -d web/node_modules/playwright-core ] || [ ! -d web/node_modules/typescript ] \
  || [ web/package-lock.json -nt web/node_modules/.package-lock.json ]; then
  echo "setup_test: npm ci in web/"
  (cd web && npm ci --no-audit --no-fund --silent)
fi
