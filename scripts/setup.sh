#!/usr/bin/env bash
# Idempotent set-up for bpftrace-hostport on Debian/Ubuntu, as root:
#   1. Debian packages (bcc for Python, iptables, conntrack, the CNI plugins, load tools),
#   2. kernel headers for bcc's run-time compile, with the fallback of shared/KERNEL.md,
#   3. a virtualenv (.venv) that sees Debian's bcc, with the package installed into it.
# Safe to run again: each step checks before it acts. Prints one line per step.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="${BPFTRACE_HOSTPORT_VENV:-$here/.venv}"
quiet=${SETUP_QUIET:-}

say() { [ -n "$quiet" ] || echo "setup: $*"; }
die() { echo "setup: $*" >&2; exit 2; }

[ "$(id -u)" = 0 ] || die "must run as root (try: sudo $0)."
command -v apt-get >/dev/null || die "needs a Debian or Ubuntu system with apt-get."

# 1. Debian packages. bcc is not on PyPI: python3-bpfcc is built for /usr/bin/python3.
pkgs=(python3-bpfcc python3-venv python3-pip iproute2 iptables nftables conntrack
      containernetworking-plugins procps util-linux wrk iperf3 bpftool ca-certificates tshark
      ${SETUP_EXTRA_PKGS:-})
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # tshark (reads our pcapng exports in the tests): no setuid dumpcap, no question asked.
  echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  say "Debian packages present"
fi

# 2. Kernel headers. bcc compiles with clang at run time against /lib/modules/$(uname -r)/build.
# Our BPF code takes no struct layout from them (offsets come from BTF at load time), so when
# no headers exist for the running kernel, Debian's generic headers are an acceptable fallback.
kver=$(uname -r)
mod="/lib/modules/$kver"
if [ -e "$mod/build/include" ] || [ -e "$mod/build/Makefile" ]; then
  say "kernel headers present for $kver"
else
  if apt-cache show "linux-headers-$kver" >/dev/null 2>&1; then
    say "installing linux-headers-$kver"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "linux-headers-$kver" >/dev/null
  fi
  if ! { [ -e "$mod/build/include" ] || [ -e "$mod/build/Makefile" ]; }; then
    arch=$(dpkg --print-architecture)
    if ! ls -d /usr/src/linux-headers-*-"$arch" >/dev/null 2>&1; then
      say "no headers package for $kver; installing linux-headers-$arch as a fallback"
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "linux-headers-$arch" >/dev/null
    fi
    build=$(ls -d /usr/src/linux-headers-*-"$arch" | sort -V | tail -n 1)
    common=$(ls -d /usr/src/linux-headers-*-common | sort -V | tail -n 1)
    [ -n "$build" ] && [ -n "$common" ] || die "could not find Debian's kernel headers under /usr/src."
    mkdir -p "$mod"
    ln -sfn "$build" "$mod/build"
    ln -sfn "$common" "$mod/source"
    say "linked $mod/build -> $build (fallback headers; struct offsets still come from BTF)"
  fi
fi

# 3. The virtualenv: Debian's python3 so that `import bcc` (python3-bpfcc) works inside it.
stamp="$venv/.bpftrace-hostport-stamp"
want=$(cat "$here/pyproject.toml" | sha256sum | cut -c1-16)
if [ ! -x "$venv/bin/python" ]; then
  say "creating virtualenv $venv"
  /usr/bin/python3 -m venv --system-site-packages "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing bpftrace-hostport into $venv"
  log=$(mktemp)
  if ! "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$here[test]" >"$log" 2>&1; then
    cat "$log" >&2; rm -f "$log"
    die "pip could not install the package into $venv (output above)."
  fi
  rm -f "$log"
  echo "$want" > "$stamp"
else
  say "virtualenv up to date"
fi
"$venv/bin/python" -c "import bcc" 2>/dev/null || die "the virtualenv cannot import bcc; is python3-bpfcc installed for /usr/bin/python3?"
ln -sfn "$venv/bin/bpftrace-hostport" /usr/local/bin/bpftrace-hostport
say "ready: $(command -v bpftrace-hostport)"
