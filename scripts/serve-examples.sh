#!/usr/bin/env bash
# Serves the example deployments in deployments/ on the local driver (the embedded default).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# HAProxy carries warm traffic when it is installed (the haproxy data plane); without it the
# Python gateway serves everything. Install it where we may (root with apt), never fail on it.
if ! command -v haproxy >/dev/null 2>&1 && [ ! -x /usr/sbin/haproxy ] && [ "$(id -u)" = 0 ] \
    && command -v apt-get >/dev/null 2>&1; then
  (apt-get install -y -qq haproxy >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq haproxy >/dev/null 2>&1)) \
    || echo "could not install haproxy; serving on the python data plane" >&2
fi
exec .venv/bin/autodeploy serve --stack dev --driver local --deployments deployments "$@"
