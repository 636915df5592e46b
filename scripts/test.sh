#!/usr/bin/env bash
# The README's test command: set up (idempotent, plus vagrant for `vagrant validate`), then
# run every test: fast unit tests and the kernel tests (real eBPF, real CNI rules, real
# packets in network namespaces this run creates and removes). With CI=true a kernel test
# that cannot run fails instead of skipping.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SETUP_EXTRA_PKGS="vagrant" bash "$here/scripts/setup.sh"
cd "$here"
exec "$here/.venv/bin/python" -m pytest -q -p no:cacheprovider tests "$@"
