#!/usr/bin/env bash
# Serves the example deployments in deployments/ on the local driver (the embedded default).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/autodeploy serve --stack dev --driver local --deployments deployments "$@"
