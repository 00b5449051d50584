#!/usr/bin/env bash
# GPU call 2 of a lease: stage the model (stage2.sh: join the GGUF halves, convert once), make the teacher's
# own greedy responses on the passage/question mix (`ctx2param data responses`, once; the held-out part is
# kept apart by passage), then train four CompAs recipes side by side for MINUTES each (equal GPU time, a
# quarter of the GPU each) and read each one's held-out losses:
#   A  the recipe (down_proj rank 8, per-layer heads, KL on the teacher's responses, additivity 0.1,
#      questions about one context set batched together)
#   B  A on all seven projections (rank 8)
#   C  A plus state alignment of the deeper layers (SADA-style, weight 1)
#   D  A with random batches (no length grouping, so the questions of a context set are seldom together)
# The best by held-out KL goes on alone in the next call (continue.sh). Results: $OUT/ablation.tgz.
#   carry: .gguf/smollm2.gguf.part-ab, .gpu/site.tgz, runs/mix.jsonl.gz (+ .sources.json)
#   STEPS=... bash hub_scripts/gpu/ablation.sh [MINUTES]
set -uo pipefail
MINUTES="${1:-4.5}"
STEPS="${STEPS:-3000}"
start=$SECONDS
bash hub_scripts/gpu/stage2.sh || exit 1
source hub_scripts/gpu/env.sh
BASE="$(base_path)"
echo "base $BASE ready at $((SECONDS - start)) s"
cp runs/mix.jsonl.gz* "$RUNS/"
python3 -m ctx2param data responses --model "$BASE" --mix "$RUNS/mix.jsonl.gz" --out "$RUNS/responses.jsonl" \
    --heldout-out "$RUNS/heldout.jsonl" --heldout-frac 0.02 --k 1,2,4,8 --questions-per-example 4 \
    --max-new-tokens 32 --batch-size 2048 --batch-tokens 1500000 --dtype bfloat16 --device cuda --seed 0 \
    --no-progress >"$RUNS/responses.log" 2>&1
echo "responses rc=$? at $((SECONDS - start)) s"; tail -n 6 "$RUNS/responses.log" | cut -c1-300
launch() {  # name, extra recipe arguments...
    local name="$1"
    shift
    setsid nohup python3 hub_scripts/train_compas.py --base "$BASE" --data "$RUNS/responses.jsonl" \
        --eval-data "$RUNS/heldout.jsonl" --out "$RUNS/abl_$name" --minutes "$MINUTES" --steps "$STEPS" \
        --workers 3 "$@" >"$RUNS/abl_$name.log" 2>&1 </dev/null &
    echo $! >"$RUNS/abl_$name.pid"
}
ALL='["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]'
launch A
launch B --set "target_modules=$ALL"
launch C --set state_weight=1.0
launch D --no-group-by-length
running() { local n=0 x; for x in A B C D; do kill -0 "$(cat "$RUNS/abl_$x.pid")" 2>/dev/null && n=$((n + 1)); done; echo $n; }
while (($(running) > 0)) && ((SECONDS - start < 585)); do
    sleep 30
    echo "--- $((SECONDS - start)) s: $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader)"
    for x in A B C D; do echo "$x: $(grep -o "{'loss'[^}]*}" "$RUNS/abl_$x.log" | tail -1 | cut -c1-160)"; done
done
mkdir -p "$RESULTS/ablation"
for x in A B C D; do
    mkdir -p "$RESULTS/ablation/$x"
    cp "$RUNS/abl_$x"/{train_metrics.json,train_log.jsonl,loss_curves.png,card_data.json,config.json} \
        "$RESULTS/ablation/$x/" 2>/dev/null
    grep -v "^{'loss'" "$RUNS/abl_$x.log" | tail -n 40 >"$RESULTS/ablation/$x/train_stdout.log"
done
cp "$RUNS/responses.log" "$RUNS"/responses*.json "$RESULTS/ablation/" 2>/dev/null
tar czf "$OUT/ablation.tgz" -C "$RESULTS" ablation
python3 hub_scripts/gpu/summary.py ablation "$RESULTS/ablation" | tee "$RUNS/best.txt"
echo "total $((SECONDS - start)) s"
