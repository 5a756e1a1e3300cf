#!/usr/bin/env bash
# Creates .venv and installs llm-lifecycle with the pinned, tested dependency set.
# Idempotent: a second run only checks that everything is in place.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# torch==2.13.0 is named in the same command on purpose: it is the CPU wheel; any resolver run
# without it may pull a multi-GB CUDA build.
.venv/bin/pip install --quiet --disable-pip-version-check \
  -c requirements/constraints.txt torch==2.13.0 -e ".[dev]"
.venv/bin/pip check
