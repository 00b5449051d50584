#!/usr/bin/env bash
# GPU call 2 of a short lease (after stage1.sh): retrain the DyPRAG baseline for MINUTES with the
# non-finite-gradient guard (the 10-minute run of 2026-12-01 turned every weight into NaN at step 531), then
# its SQuAD-200 reading. Outputs go to $OUT as they are made, so a time limit keeps what finished.
#   bash hub_scripts/gpu/dyprag_rerun.sh MINUTES
#   carry: .gguf/smollm2.gguf.part-ab, .gpu/site.tgz, runs/compas_data.jsonl.gz,
#          runs/compas_data.jsonl.sources.json
set -uo pipefail
MINUTES="${1:-2.2}"
start=$SECONDS
bash hub_scripts/gpu/stage2.sh || exit 1
source hub_scripts/gpu/env.sh
BASE="$(base_path)"
gunzip -c runs/compas_data.jsonl.gz >"$RUNS/compas_data.jsonl"
cp runs/compas_data.jsonl.sources.json "$RUNS/"  # the mix's sources, for the model card
python3 hub_scripts/train_compas.py --method dyprag --base "$BASE" --data "$RUNS/compas_data.jsonl" \
    --out "$RUNS/dyprag" --minutes "$MINUTES" --batch-size 32 --workers 3 >"$RUNS/dyprag.log" 2>&1
echo "training rc=$? at $((SECONDS - start)) s"; tail -n 2 "$RUNS/dyprag.log" | cut -c1-400
mkdir -p "$OUT/dyprag"
cp "$RUNS/dyprag"/*.json "$RUNS/dyprag"/train_log.jsonl "$RUNS/dyprag"/*.png "$OUT/dyprag/" 2>/dev/null
cp "$RUNS/dyprag.log" "$OUT/dyprag/train_stdout.log"
OUT="$OUT" python3 - <<'PY'  # the weights in bf16 (6.4 MB -> 3.2 MB), so that a later CPU evaluation can use them
import os
import torch
from safetensors.torch import load_file, save_file
src, out = os.environ["RUNS"] + "/dyprag/model.safetensors", os.environ["OUT"] + "/dyprag/model.safetensors.bf16"
save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(src).items()}, out)
PY
python3 hub_scripts/train_compas.py --base "$BASE" --out "$RUNS/dyprag" --eval-only --eval-squad 200 \
    --eval-batch-size 100 >"$RUNS/eval_dyprag.log" 2>&1
echo "eval rc=$? at $((SECONDS - start)) s"; tail -n 5 "$RUNS/eval_dyprag.log" | cut -c1-300
cp -r "$RUNS/dyprag/squad_eval" "$OUT/dyprag/" 2>/dev/null; cp "$RUNS/eval_dyprag.log" "$OUT/dyprag/"
python3 hub_scripts/gpu/summary.py "$OUT"
