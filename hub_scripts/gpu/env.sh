# Sourced by the GPU job scripts: where staged packages, the model and results live on the GPU machine.
# Everything outside the working tree lives under /tmp and survives between calls while the machine is warm.
export SITE=/tmp/site STAGE=/tmp/stage RUNS=/tmp/runs RESULTS=/tmp/results
export PYTHONPATH="$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export CTX2PARAM_CACHE=/tmp/c2p_cache HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export SMOLLM2_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
mkdir -p "$SITE" "$STAGE" "$RUNS" "$RESULTS"
base_path() { python3 -c 'from ctx2param.testing_utils import smollm2_path; print(smollm2_path())'; }
