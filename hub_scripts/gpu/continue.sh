#!/usr/bin/env bash
# GPU call 3 of a lease: the best recipe of ablation.sh (by held-out KL) goes on alone for MINUTES (its
# checkpoint resumed exactly, same settings), its generator comes out in bf16 ($OUT/compas_run.tgz: config,
# weights, card data, metrics, log, loss curves) BEFORE any evaluation, then `ctx2param eval` reads it out on
# SQuAD-k (n = 1000, seed 0, k = K_LIST, the adapter system; closed-book and ICL are committed baselines).
#   STEPS=... bash hub_scripts/gpu/continue.sh [MINUTES] [K_LIST]
set -uo pipefail
MINUTES="${1:-5}"
KS="${2:-1,2,4,8,16,32,64}"
STEPS="${STEPS:-3000}"
start=$SECONDS
source hub_scripts/gpu/env.sh
BASE="$(base_path)"
BEST="$(awk '/^best /{print $2}' "$RUNS/best.txt")"
ALL='["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]'
case "$BEST" in
    A) EXTRA=() ;;
    B) EXTRA=(--set "target_modules=$ALL") ;;
    C) EXTRA=(--set state_weight=1.0) ;;
    D) EXTRA=(--no-group-by-length) ;;
    *) echo "no best run in $RUNS/best.txt"; exit 1 ;;
esac
RUN="$RUNS/abl_$BEST"
echo "continuing $BEST (${EXTRA[*]:-recipe}) from $(ls -d "$RUN"/checkpoint-* | tail -1)"
python3 hub_scripts/train_compas.py --base "$BASE" --data "$RUNS/responses.jsonl" --eval-data "$RUNS/heldout.jsonl" \
    --out "$RUN" --minutes "$MINUTES" --steps "$STEPS" --workers 8 --resume "${EXTRA[@]}" >"$RUNS/continue.log" 2>&1
echo "training rc=$? at $((SECONDS - start)) s"; grep -v "^{'loss'" "$RUNS/continue.log" | tail -n 6 | cut -c1-300
# the generator first (bf16 weights), so that a deadline during the evaluation still brings it back
mkdir -p /tmp/compas_run
RUN="$RUN" python3 - <<'PY'
import os, shutil
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
src, dest = Path(os.environ["RUN"]), Path("/tmp/compas_run")
tensors = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(src / "model.safetensors").items()}
save_file(tensors, dest / "model.safetensors", metadata={"format": "pt", "dtype": "bfloat16"})
for name in ("config.json", "card_data.json", "train_metrics.json", "train_log.jsonl", "loss_curves.png"):
    if (src / name).is_file():
        shutil.copy(src / name, dest / name)
print("weights", sum(t.numel() for t in tensors.values()), "parameters")
PY
cp "$RUNS/continue.log" /tmp/compas_run/train_stdout.log
tar czf "$OUT/compas_run.tgz" -C /tmp compas_run && ls -la "$OUT"
left=$((590 - (SECONDS - start)))
timeout "$((left > 60 ? left - 20 : 40))" python3 -m ctx2param eval --model "$RUN" --base "$BASE" --task squad-k \
    --k "$KS" --n 1000 --systems adapter --seed 0 --device cuda --dtype bfloat16 --batch-size 256 --no-progress \
    --out "$RESULTS/squad_k" >"$RUNS/squad_k.log" 2>&1
echo "eval rc=$? at $((SECONDS - start)) s"; tail -n 5 "$RUNS/squad_k.log" | cut -c1-300
cp "$RUNS/squad_k.log" "$RESULTS/squad_k/" 2>/dev/null
tar czf "$OUT/squad_k.tgz" -C "$RESULTS" squad_k
python3 hub_scripts/gpu/summary.py squad "$RESULTS/squad_k/results.json"
echo "total $((SECONDS - start)) s"
