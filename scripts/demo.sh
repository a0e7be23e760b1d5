#!/usr/bin/env bash
# The main job: set up, then run FMA against dense attention on the built-in input.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
cargo run --release --example demo -- "$@"
