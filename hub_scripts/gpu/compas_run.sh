#!/usr/bin/env bash
# GPU call 2 of a short lease: stage the model (stage2.sh: join the GGUF halves, convert once), make the teacher's
# own greedy responses on the passage/question mix once (`ctx2param data responses`; the mix's dev passages held
# out), train the CompAs recipe alone for MINUTES (the schedule spans STEPS), and bring the generator back in
# bf16 with its metrics, log and loss curves ($OUT/compas_run.tgz) for evaluation elsewhere.
#   carry: .gguf/smollm2.gguf.part-ab, .gpu/site.tgz, runs/mix.jsonl.gz (+ .sources.json)
#   [LIMIT=16000] bash hub_scripts/gpu/compas_run.sh MINUTES STEPS
set -uo pipefail
MINUTES="${1:-4}"
STEPS="${2:-260}"
LIMIT="${LIMIT:-16000}"
start=$SECONDS
bash hub_scripts/gpu/stage2.sh || exit 1
source hub_scripts/gpu/env.sh
BASE="$(base_path)"
echo "base $BASE ready at $((SECONDS - start)) s"
cp runs/mix.jsonl.gz* "$RUNS/"
python3 -m ctx2param data responses --model "$BASE" --mix "$RUNS/mix.jsonl.gz" --out "$RUNS/responses.jsonl" \
    --heldout-out "$RUNS/heldout.jsonl" --heldout-frac 0.02 --k 1,2,4,8 --questions-per-example 4 \
    --max-new-tokens 32 --batch-size 2048 --batch-tokens 1500000 --dtype bfloat16 --device cuda --seed 0 \
    --limit "$LIMIT" --no-progress >"$RUNS/responses.log" 2>&1
echo "responses rc=$? at $((SECONDS - start)) s"; tail -n 4 "$RUNS/responses.log" | cut -c1-300
python3 hub_scripts/train_compas.py --base "$BASE" --data "$RUNS/responses.jsonl" --eval-data "$RUNS/heldout.jsonl" \
    --out "$RUNS/compas" --minutes "$MINUTES" --steps "$STEPS" --workers 12 >"$RUNS/compas.log" 2>&1
echo "training rc=$? at $((SECONDS - start)) s"; grep -v "^{'loss'" "$RUNS/compas.log" | tail -n 8 | cut -c1-400
grep -o "{'loss'[^}]*}" "$RUNS/compas.log" | tail -n 3 | cut -c1-300
mkdir -p /tmp/compas_run
RUN="$RUNS/compas" python3 - <<'PY'
import os, shutil
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
src, dest = Path(os.environ["RUN"]), Path("/tmp/compas_run")
tensors = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(src / "model.safetensors").items()}
save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
for name in ("config.json", "card_data.json", "train_metrics.json", "train_log.jsonl", "loss_curves.png"):
    if (src / name).is_file():
        shutil.copy(src / name, dest / name)
print("weights:", sum(t.numel() for t in tensors.values()), "parameters in bf16")
PY
cp "$RUNS/compas.log" /tmp/compas_run/train_stdout.log
cp "$RUNS/responses.log" "$RUNS"/responses*.json "$RUNS"/heldout*.json /tmp/compas_run/ 2>/dev/null
gzip -c "$RUNS/heldout.jsonl" >/tmp/compas_run/heldout.jsonl.gz
tar czf "$OUT/compas_run.tgz" -C /tmp compas_run && ls -la "$OUT"
echo "total $((SECONDS - start)) s"
