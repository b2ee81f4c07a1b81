#!/usr/bin/env bash
# Start, inspect and stop a local multi-node Ray cluster on this machine (for tests and demos).
#   cluster/local-cluster.sh start --nodes 2 --cpus-per-node 1 --temp-dir /tmp/mova-lc
#   cluster/local-cluster.sh status --state /tmp/mova-lc/local_cluster.json
#   eval "$(cluster/local-cluster.sh env --state /tmp/mova-lc/local_cluster.json)"  # join it
#   cluster/local-cluster.sh stop --state /tmp/mova-lc/local_cluster.json
# All options: cluster/local-cluster.sh start --help. Uses $PYTHON, else the repository's
# .venv, else python3.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-}"
if [[ -z "${python}" ]]; then
    if [[ -x "${here}/../.venv/bin/python" ]]; then
        python="${here}/../.venv/bin/python"
    else
        python="python3"
    fi
fi
exec "${python}" "${here}/local_cluster.py" "$@"
