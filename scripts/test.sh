#!/usr/bin/env bash
# Runs the whole test suite. Docker tests need a running Docker Engine (CI starts one);
# GPU tests (-m gpu) and the Pulumi CLI test skip with their reason where those are absent.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m pytest "$@"
