#!/usr/bin/env bash
# Runs the whole test suite. Docker tests need a running Docker Engine (CI starts one);
# GPU tests (-m gpu) and the Pulumi CLI test skip with their reason where those are absent.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# The end-to-end tests mostly wait on processes and sockets: four pytest workers keep two
# cores busy (about 5 min for ~950 tests on 2 cores). TEST_WORKERS=0 runs in one process.
exec .venv/bin/python -m pytest -n "${TEST_WORKERS:-4}" "$@"
