#!/usr/bin/env bash
# GPU call 3 of a lease: wait for the trainings that train.sh started, copy their weights out (bf16), evaluate
# the trained generators side by side, time the context-cost benchmark alone on the GPU, wait for the
# baselines that train.sh started, and pack everything into $OUT (results.tgz.part-*, plus the generators'
# weights in bf16 as weights.tgz.part-*). JOBS names the trainings to wait for and evaluate (default: all
# three); BASE_MEMORY=1 first measures the base's weight memory (bf16 / 8-bit / 4-bit).
#   [JOBS="compas dyprag stream_adapter"] [BASE_MEMORY=1] bash hub_scripts/gpu/evaluate.sh [DEADLINE_SECONDS]
set -uo pipefail
DEADLINE="${1:-560}"
JOBS="${JOBS:-compas dyprag stream_adapter}"
start=$SECONDS
source hub_scripts/gpu/env.sh
BASE="$(base_path)"
left() { echo $((DEADLINE - (SECONDS - start))); }
if [[ "${BASE_MEMORY:-0}" == 1 ]]; then  # memory, not time, is measured: it may overlap the trainings
    timeout 120 python3 benchmarks/base_memory.py --devices cuda --out "$RESULTS/base_memory_cuda.json" \
        >"$RUNS/base_memory.log" 2>&1
    echo "base_memory rc=$?"; tail -n 8 "$RUNS/base_memory.log" | cut -c1-300
fi
for name in $JOBS; do
    pid=$(cat "$RUNS/$name.pid" 2>/dev/null || echo 0)
    while kill -0 "$pid" 2>/dev/null && (($(left) > 200)); do sleep 5; done
    echo "$name training: $(kill -0 "$pid" 2>/dev/null && echo STILL RUNNING || echo ended) at $((SECONDS - start)) s"
    tail -n 3 "$RUNS/$name.log" | cut -c1-400
done
# the weights first, so that a deadline during the evaluations still brings them back
JOBS="$JOBS" python3 - <<'PY'
import os
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
runs, dest = Path(os.environ["RUNS"]), Path("/tmp/weights")
for name in os.environ["JOBS"].split():
    src = runs / name
    if not (src / "model.safetensors").is_file():
        print(f"{name}: no model.safetensors")
        continue
    (dest / name).mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(src / "model.safetensors").items()}
    save_file(tensors, dest / name / "model.safetensors.bf16", metadata={"format": "pt"})
    for f in src.glob("*.json"):
        (dest / name / f.name).write_bytes(f.read_bytes())
PY
tar czf /tmp/weights.tgz -C /tmp weights && split -b 15M /tmp/weights.tgz "$OUT/weights.tgz.part-"
bg() {  # name, command... (bounded by the deadline)
    local name="$1"
    shift
    timeout "$(( $(left) - 200 > 30 ? $(left) - 200 : 30 ))" "$@" >"$RUNS/$name.log" 2>&1 &
    echo "started $name"
}
for name in $JOBS; do
    case "$name" in
        compas | dyprag) bg "eval_$name" python3 hub_scripts/train_compas.py --base "$BASE" --out "$RUNS/$name" \
            --eval-only --eval-squad 200 --eval-batch-size 50 ;;
        stream_adapter) bg eval_stream_adapter python3 hub_scripts/train_stream_adapter.py --base "$BASE" \
            --out "$RUNS/stream_adapter" --eval-only --eval 300 ;;
    esac
done
wait
# context cost alone on the GPU, after the evaluations (its JSON is rewritten after every k, so the deadline
# keeps the rows it finished)
timeout "$(( $(left) - 60 < 240 ? $(left) - 60 : 240 ))" python3 benchmarks/context_cost.py --device cuda \
    --dtype bfloat16 --base "$BASE" --k 1,4,16 --questions 64 --repeats 3 --decode-tokens 64 \
    --out "$RESULTS/context_cost_cuda.json" >"$RUNS/context_cost.log" 2>&1
echo "context_cost rc=$? ($((SECONDS - start)) s)"; tail -n 15 "$RUNS/context_cost.log"
for name in baseline_squad_k baseline_squad_k_long baseline_mmlu-k baseline_mmlu-k_25; do
    [[ -f "$RUNS/$name.pid" ]] || continue
    pid=$(cat "$RUNS/$name.pid")
    while kill -0 "$pid" 2>/dev/null && (($(left) > 45)); do sleep 5; done
    echo "$name: $(kill -0 "$pid" 2>/dev/null && echo STILL RUNNING || echo ended) at $((SECONDS - start)) s"
done
for f in "$RUNS"/eval_*.log "$RUNS"/baseline_*.log; do
    [[ -f "$f" ]] && { echo "== $f"; tail -n 12 "$f" | cut -c1-300; }
done
for name in $JOBS; do
    mkdir -p "$RESULTS/$name"
    cp "$RUNS/$name"/*.json "$RUNS/$name"/train_log.jsonl "$RUNS/$name"/*.png "$RESULTS/$name/" 2>/dev/null
    cp -r "$RUNS/$name/squad_eval" "$RESULTS/$name/" 2>/dev/null
    cp "$RUNS/$name.log" "$RESULTS/$name/train_stdout.log" 2>/dev/null
done
cp "$RUNS"/*.log "$RESULTS/" 2>/dev/null
# $OUT takes files of at most 16 MiB: the archive goes in 15 MB parts (cat results.tgz.part-* | tar xz)
tar czf /tmp/results.tgz -C /tmp results && split -b 15M /tmp/results.tgz "$OUT/results.tgz.part-"
python3 hub_scripts/gpu/summary.py "$RESULTS"
ls -la "$OUT"
echo "total $((SECONDS - start)) s"
