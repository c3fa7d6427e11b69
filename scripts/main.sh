#!/usr/bin/env bash
# The main job: set up .venv, fine-tune the default model on the bundled example
# (order messages -> JSON), then show the model's answers on held-out prompts
# before (the bare base) and after (base + adapter), with the accuracy.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
start=$(date +%s)
.venv/bin/tsugiki train --config examples/order_extraction.yaml
.venv/bin/tsugiki eval --adapter outputs/order-extraction --data examples/data/test.jsonl \
    --show 6 --max-new-tokens 40 --batch-size 16 --no-loss
echo "main job finished in $(( $(date +%s) - start )) s"
