#!/usr/bin/env bash
# GPU call 2 of a short lease (no training): stage the model (stage2.sh), then measure the base's weight
# memory (bf16 / 8-bit / 4-bit), time the context-cost benchmark on the idle GPU, run the closed-book / ICL
# baselines side by side, and pack the results into $OUT/results.tgz.
#   bash hub_scripts/gpu/baselines.sh [DEADLINE_SECONDS]
#   carry: .gguf/smollm2.gguf.part-ab, .gpu/site.tgz
set -uo pipefail
DEADLINE="${1:-560}"
start=$SECONDS
bash hub_scripts/gpu/stage2.sh || exit 1
source hub_scripts/gpu/env.sh
BASE="$(base_path)"
left() { echo $((DEADLINE - (SECONDS - start))); }
timeout 100 python3 benchmarks/base_memory.py --base "$BASE" --devices cuda \
    --out "$RESULTS/base_memory_cuda.json" >"$RUNS/base_memory.log" 2>&1
echo "base_memory rc=$? ($((SECONDS - start)) s)"; tail -n 8 "$RUNS/base_memory.log" | cut -c1-300
timeout 150 python3 benchmarks/context_cost.py --device cuda --dtype bfloat16 --base "$BASE" \
    --k 1,4,16 --questions 64 --repeats 3 --out "$RESULTS/context_cost_cuda.json" >"$RUNS/context_cost.log" 2>&1
echo "context_cost rc=$? ($((SECONDS - start)) s)"; tail -n 15 "$RUNS/context_cost.log" | cut -c1-300
EVAL=(python3 -m ctx2param eval --device cuda --dtype bfloat16 --no-progress --seed 0 --model "$BASE")
budget=$(($(left) - 30))
timeout "$budget" "${EVAL[@]}" --task squad-k --k 1,2,4,8,16,32,64 --n 1000 --systems closed,icl \
    --batch-size 64 --out "$RESULTS/baseline_squad_k" >"$RUNS/baseline_squad_k.log" 2>&1 &
for task in arc-easy-k arc-challenge-k mmlu-k; do
    timeout "$budget" "${EVAL[@]}" --task "$task" --k 0,1,5,25 --systems closed,icl \
        --out "$RESULTS/baseline_$task" >"$RUNS/baseline_$task.log" 2>&1 &
done
wait
for f in "$RUNS"/baseline_*.log; do echo "== $f"; tail -n 10 "$f" | cut -c1-300; done
cp "$RUNS"/*.log "$RESULTS/" 2>/dev/null
tar czf "$OUT/results.tgz" -C /tmp results
python3 hub_scripts/gpu/summary.py "$RESULTS"
echo "total $((SECONDS - start)) s"
