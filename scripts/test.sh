#!/usr/bin/env bash
# The README's test command: set up (idempotent, plus what only the tests need), then
# run every test: fast unit tests and the kernel tests (real eBPF, real CNI rules, real
# packets in network namespaces this run creates and removes). With CI=true a kernel test
# that cannot run fails instead of skipping.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# vagrant for `vagrant validate`; containerd, runc, busybox-static, gcc and libc6-dev for the
# kernel tests' containerd labs (`lab up --runtime containerd` builds its images with them);
# prometheus (2.42: the server and promtool) for the alert tests and the dashboard queries on a
# real Prometheus (on a machine that runs systemd, Debian starts its prometheus service on
# :9090; the tests never use it: `systemctl disable --now prometheus` if you do not want it);
# tmux for the live view's tests at 80x24, chromium for the HTML report laid out at 1280 px.
SETUP_EXTRA_PKGS="vagrant containerd runc busybox-static gcc libc6-dev prometheus tmux chromium" bash "$here/scripts/setup.sh"
cd "$here"
# The lab's nftables portmap (plugins 1.9.1 from Debian unstable, unpacked into a cache of its
# own, nothing installed): fetched once; its tests fail under CI=true when it cannot be had.
"$here/.venv/bin/python" -m bpftrace_hostport.lab.plugins >/dev/null || echo "test.sh: the nftables portmap's plugins could not be fetched (above); its tests will say so" >&2
exec "$here/.venv/bin/python" -m pytest -q -p no:cacheprovider tests "$@"
