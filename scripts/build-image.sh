#!/usr/bin/env bash
# Build the node agent image (deploy/Containerfile) with podman, without pulling from any
# container registry: the Debian bookworm base is bootstrapped here with mmdebstrap from this
# machine's own apt sources, and the package goes in as a wheel built from this checkout.
#
#   bash scripts/build-image.sh            # -> localhost/bpftrace-hostport:<version>
#   IMAGE=registry.example/ops/bpftrace-hostport:0.2.0 bash scripts/build-image.sh
#
# Then push it to your registry and point deploy/daemonset.yaml at it.
#
# Idempotent: installs podman/runc/mmdebstrap only when missing, writes its podman config only
# when absent, bootstraps the base image only once; the wheel and the image are rebuilt every time
# (podman's layer cache keeps that quick). Every container it runs uses the host network: it
# never creates a bridge network (the machines it runs on may not allow one).
# Needs root (mmdebstrap in root mode, rootful podman).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n 1)
[ -n "$version" ] || { echo "build-image: no version in pyproject.toml" >&2; exit 1; }
IMAGE=${IMAGE:-localhost/bpftrace-hostport:$version}
BASE_IMAGE=${BASE_IMAGE:-localhost/bookworm-base}
SUITE=bookworm
PODMAN_CONF=/etc/containers/containers.conf.d/bpftrace-hostport.conf
# The host's CA bundle: pip in the build must trust whatever TLS the host trusts (an
# intercepting egress proxy's CA included). It is mounted beside /etc/ssl/certs, not over it:
# over it, the image's own ca-certificates package could not write its bundle there and apt
# would fail in the same RUN step.
HOST_CERTS=/etc/ssl/certs
CERTS_IN_BUILD=/etc/ssl/host-certs

if [ "$(id -u)" != 0 ]; then
  echo "build-image: run as root (mmdebstrap and podman need root here)." >&2
  exit 1
fi

# --- tools ----------------------------------------------------------------------------------
missing=()
for tool in podman runc mmdebstrap; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "build-image: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# --- podman configuration ---------------------------------------------------------------------
# runc explicitly: it is what we install above, whatever else (crun) is or is not present.
# Explicit ulimits: rootful podman otherwise asks for its built-in nofile/nproc limits, which
# fail on machines whose hard limits are lower; these fit common limits and are ample for
# apt and pip.
if [ ! -e "$PODMAN_CONF" ]; then
  mkdir -p "$(dirname "$PODMAN_CONF")"
  cat >"$PODMAN_CONF" <<'EOF'
# Written by bpftrace-hostport's scripts/build-image.sh (kept if it exists).
[engine]
runtime = "runc"

[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
EOF
  echo "build-image: wrote $PODMAN_CONF"
fi

stage=$(mktemp -d /tmp/bpftrace-hostport-image.XXXXXX)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/src" "$stage/dist"

# --- base image -------------------------------------------------------------------------------
# minbase: apt, dpkg and essentials only; the Containerfile adds what the agent needs.
if ! podman image exists "$BASE_IMAGE"; then
  . /etc/os-release
  if [ "${VERSION_CODENAME:-}" != "$SUITE" ] && [ -z "${BASE_SOURCES:-}" ]; then
    echo "build-image: this machine's apt sources are for ${VERSION_CODENAME:-unknown}, not $SUITE;" \
         "set BASE_SOURCES to a $SUITE sources file (one-line or deb822)." >&2
    exit 1
  fi
  # The machine's configured sources (mirror, snapshot, security), in either format; files that
  # are disabled (other extensions) are left out, as apt itself does.
  sources=()
  if [ -n "${BASE_SOURCES:-}" ]; then
    sources=("$BASE_SOURCES")
  else
    if [ -s /etc/apt/sources.list ] && grep -q '^[[:space:]]*deb' /etc/apt/sources.list; then
      sources+=(/etc/apt/sources.list)
    fi
    for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
      [ -s "$f" ] && sources+=("$f")
    done
  fi
  [ "${#sources[@]}" -gt 0 ] || { echo "build-image: no apt sources configured" >&2; exit 1; }
  echo "build-image: bootstrapping $BASE_IMAGE from ${sources[*]}"
  mmdebstrap --variant=minbase --format=tar "$SUITE" "$stage/base.tar" "${sources[@]}"
  podman import --quiet "$stage/base.tar" "$BASE_IMAGE" >/dev/null
  rm -f "$stage/base.tar"
fi

# --- wheel ------------------------------------------------------------------------------------
# `pip wheel --no-deps -w dist .`, run on a copy of the checkout inside the staging context: the
# build then writes no build/, egg-info or dist/ into the working tree, and the context holds
# exactly the Containerfile and one wheel (not .venv), so no stale wheel of another version
# gets copied into the image.
tar -C "$here" --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist \
    --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache --exclude=./bench/out \
    --exclude=./vagrant/.vagrant -cf - . | tar -C "$stage/src" -xf -
(cd "$stage/src" && "$here/.venv/bin/python" -m pip wheel --quiet --no-deps -w "$stage/dist" .)
ls "$stage"/dist/bpftrace_hostport-"$version"-*.whl >/dev/null
cp "$here/deploy/Containerfile" "$stage/Containerfile"

# --- image ------------------------------------------------------------------------------------
cert_args=()
if [ -s "$HOST_CERTS/ca-certificates.crt" ]; then
  cert_args=(-v "$HOST_CERTS:$CERTS_IN_BUILD:ro" --build-arg "PIP_CERT=$CERTS_IN_BUILD/ca-certificates.crt")
fi
# --pull=never: the base is local; nothing may come from a registry.
# --network host: apt and pip reach their indexes through the host's network, no bridge.
# --force-rm: no build container is left behind, even when a step fails.
podman build \
  --network host \
  --pull=never \
  --force-rm \
  --build-arg "BASE=$BASE_IMAGE" \
  "${cert_args[@]}" \
  -f "$stage/Containerfile" \
  -t "$IMAGE" \
  "$stage"

echo "build-image: built $IMAGE"
