#!/usr/bin/env bash
# The README's main command: set up (idempotent), then run the lab demo:
# a node, the nginx-hostport pod, a client, traffic, a live trace and a summary.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$here/scripts/setup.sh"
exec "$here/.venv/bin/bpftrace-hostport" lab demo "$@"
