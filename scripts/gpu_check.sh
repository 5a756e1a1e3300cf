#!/usr/bin/env bash
# The GPU check: one step of every algorithm (pretraining/SFT, distillation, the reward model,
# DPO, GRPO, PPO, the compressors, evaluation, the watermark processor) on each architecture's
# tiny random model (lifecycle/tiny.py), in bf16 on CUDA, with no Ray, Prefect or MLflow.
# Prints one JSON line per check (pass/fail, timings) and a summary; exit 1 when one failed.
#
#   scripts/gpu_check.sh                       # on a GPU machine: torch, transformers, peft
#   scripts/gpu_check.sh --device cpu --dtype float32 --arch qwen2   # anywhere
#
# Needs torch, transformers, peft, tokenizers, pyarrow and pyyaml (a CUDA image with PyTorch
# has them) and pydantic: when it is missing, wheels under .whl/ (ignored by git) are
# installed into a temp dir first, else the check stops with that message. Made to finish in
# under 8 minutes on one GPU; never part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import pydantic" 2>/dev/null; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/gpu-check-site .whl/*.whl
        export PYTHONPATH=/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "gpu_check: pydantic is not installed and no wheels are under .whl/" >&2
        exit 2
    fi
fi
args=("$@")
if [[ " ${args[*]-} " != *" --device "* ]]; then
    args+=(--device cuda --dtype bfloat16)
fi
export PYTHONUNBUFFERED=1
exec timeout 480 "$PY" scripts/gpu_check.py --block ray,prefect,mlflow "${args[@]}"
