#!/usr/bin/env bash
# Installs everything the tests need (on a fresh machine too) and runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
. .venv/bin/activate
python -m pytest tests "$@"
