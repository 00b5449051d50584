#!/usr/bin/env bash
# GPU call 2 of a lease: stage the model (stage2.sh), then start the
# CompAs, DyPRAG and StreamAdapter trainings side by side on the one GPU, with the closed-book / ICL
# baselines of the base model beside them (setsid: they outlive this call while the machine stays warm),
# and watch them until this call's time is nearly up. JOBS picks what starts (default: all four); a training
# started alone has the GPU to itself, so its throughput is the GPU's, not a share of it.
#   [JOBS="compas dyprag stream_adapter baselines"] bash hub_scripts/gpu/train.sh MINUTES [WATCH_SECONDS]
#   carry: .gguf/smollm2.gguf.part-ab, .gpu/site.tgz, runs/compas_data.jsonl.gz,
#          runs/compas_data.jsonl.sources.json
set -euo pipefail
MINUTES="${1:-10.2}"
WATCH="${2:-540}"
JOBS="${JOBS:-compas dyprag stream_adapter baselines}"
start=$SECONDS
bash hub_scripts/gpu/stage2.sh
source hub_scripts/gpu/env.sh
BASE="$(base_path)"
gunzip -c runs/compas_data.jsonl.gz >"$RUNS/compas_data.jsonl"
cp runs/compas_data.jsonl.sources.json "$RUNS/"  # the mix's sources, for the model card
launch() {  # name, command...
    local name="$1"
    shift
    setsid nohup "$@" >"$RUNS/$name.log" 2>&1 </dev/null &
    echo $! >"$RUNS/$name.pid"
    echo "started $name (pid $!)"
}
wanted() { [[ " $JOBS " == *" $1 "* ]]; }
TRAIN=(python3 hub_scripts/train_compas.py --base "$BASE" --data "$RUNS/compas_data.jsonl" --minutes "$MINUTES"
    --batch-size 32 --workers 3)
wanted compas && launch compas "${TRAIN[@]}" --out "$RUNS/compas"
wanted dyprag && launch dyprag "${TRAIN[@]}" --method dyprag --out "$RUNS/dyprag"
wanted stream_adapter && launch stream_adapter python3 hub_scripts/train_stream_adapter.py --base "$BASE" \
    --out "$RUNS/stream_adapter" --minutes "$MINUTES" --total-minutes "$MINUTES" --workers 5
# closed-book / ICL baselines of the base model (inference only), in the background beside the trainings;
# ARC-Easy / ARC-Challenge are done (benchmarks/results/baselines/). SQuAD-k and MMLU run in two parts each
# so that they finish in the lease; the parts' results.json are merged afterwards (`ctx2param merge-results`).
EVAL=(python3 -m ctx2param eval --device cuda --dtype bfloat16 --no-progress --seed 0 --model "$BASE")
BASELINES=""
if wanted baselines; then
    BASELINES="baseline_squad_k baseline_squad_k_long baseline_mmlu-k baseline_mmlu-k_25"
    launch baseline_squad_k timeout 1200 "${EVAL[@]}" --task squad-k --k 1,2,4,8,16 --n 1000 \
        --systems closed,icl --batch-size 64 --out "$RESULTS/baseline_squad_k"
    # batch 16 at k >= 32: at batch 64 the 8k-token prompts took ~40 GB, and beside the trainings the GPU ran out
    launch baseline_squad_k_long timeout 1200 "${EVAL[@]}" --task squad-k --k 32,64 --n 1000 \
        --systems icl --batch-size 16 --out "$RESULTS/baseline_squad_k_long"
    launch baseline_mmlu-k timeout 1200 "${EVAL[@]}" --task mmlu-k --k 0,1,5 --systems closed,icl \
        --out "$RESULTS/baseline_mmlu-k"
    launch baseline_mmlu-k_25 timeout 1200 "${EVAL[@]}" --task mmlu-k --k 25 --systems icl --batch-size 8 \
        --out "$RESULTS/baseline_mmlu-k_25"
fi
running() {  # how many of the started jobs are still running
    local name count=0
    for name in compas dyprag stream_adapter $BASELINES; do
        [[ -f "$RUNS/$name.pid" ]] && kill -0 "$(cat "$RUNS/$name.pid")" 2>/dev/null && count=$((count + 1))
    done
    echo "$count"
}
while ((SECONDS - start < WATCH)) && (($(running) > 0)); do
    sleep 45
    echo "--- $((SECONDS - start)) s: $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader)"
    for name in compas dyprag stream_adapter $BASELINES; do
        [[ -f "$RUNS/$name.pid" ]] || continue
        alive=$(kill -0 "$(cat "$RUNS/$name.pid")" 2>/dev/null && echo running || echo ended)
        echo "$name [$alive]: $(tail -c 300 "$RUNS/$name.log" | tr '\r' '\n' | grep -v '^\s*$' | tail -1 | cut -c1-200)"
    done
done
