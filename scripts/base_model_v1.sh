#!/usr/bin/env bash
# Writes runs/default_v1: the bundled model as it was at commit b3a3096 (the base run only), the model the
# Turbo, DPO and prompt-enhancer tables were measured with. Needs the repository's history (a full clone).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/default_v1}
mkdir -p "$out/transformer"
for f in pipeline.json transformer/config.json transformer/model.safetensors; do
  git show "b3a3096:src/ernielab/assets/default/$f" > "$out/$f"
done
echo "$out"
