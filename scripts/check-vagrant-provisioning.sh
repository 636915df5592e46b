#!/usr/bin/env bash
# Check vagrant/Vagrantfile's provisioning without a VM: the same steps, on the same Debian release,
# in a container on this machine's kernel.
#
#   bash scripts/check-vagrant-provisioning.sh
#   bash scripts/check-vagrant-provisioning.sh --rebuild-base     # bootstrap the base image again
#
# What it reads from the Vagrantfile: the box (debian/<release>64 -> that Debian release), the
# synced folder's target and rsync excludes, the VM's CPUs and memory, and the inline provisioning
# script. Then:
#   base       a Debian <release> image made as scripts/build-image.sh makes its bookworm base:
#              mmdebstrap --variant=minbase from this machine's configured apt sources (the
#              Debian entries, with this machine's release name replaced by the box's), imported
#              with podman; kept as localhost/<release>-base (build-image.sh's own base is reused
#              when the releases are the same).
#   setup.sh   the repository copied (tar, the Vagrantfile's rsync excludes; never mounted) into
#              a fresh container at the synced folder's path, then `bash scripts/setup.sh`:
#              packages, kernel headers (with the fallback), the virtualenv. This runs in an
#              UNPRIVILEGED container (--network host, default capabilities, /proc/sys
#              read-only), so no package maintainer script can touch the host's sysctls or
#              firewall. The result is committed to a temporary image.
#   demo.sh    `bash scripts/demo.sh` (setup again: must be a no-op, then `lab demo`) in a
#              PRIVILEGED container from that image, on the host kernel (the netfilter BPF
#              link, network namespaces), with the VM's CPUs and memory as limits.
#   provision  the Vagrantfile's inline provisioning script, verbatim, in the same container.
#   netns      the container's /var/run/netns is its own (it starts empty while the host has
#              namespaces, and it is never mounted from the host): the demo's namespaces exist
#              only in the container's mount namespace and go away with it. Checked: none is
#              left in the container after the demo, and none of the demo's names shows up on
#              the host.
# Every step prints PASS or FAIL (SKIP when an earlier step it needs failed); exit 1 if any
# failed. The containers and the temporary image are removed on every exit path.
#
# What a container cannot check, and why:
#   - Vagrant itself (box download, VirtualBox/libvirt, the rsync synced folder, `vagrant up`):
#     no hypervisor here, and no network beyond the package registries.
#   - The VM's own kernel: the box boots Debian's kernel (6.12 for trixie), for which setup.sh
#     installs the exact linux-headers-$(uname -r). A container shares this machine's kernel,
#     which has no Debian headers package, so setup.sh takes its fallback branch instead
#     (linux-headers-<arch> linked as /lib/modules/$(uname -r)/build). The exact-headers branch
#     is not exercised, and the demo runs on this kernel, not 6.12.
#   - A full Debian install with systemd as PID 1: the container starts from minbase with no
#     init system; setup.sh and the demo need neither.
#   - Network: the VM has its own NAT network; here the container uses the host's network
#     (the lab itself only ever uses namespaces it creates).
# Site configuration copied into the container because this machine needs it to reach PyPI
# (a TLS-intercepting egress proxy): the host's /usr/local/share/ca-certificates/*.crt (picked up
# when setup.sh installs ca-certificates) and /etc/pip.conf. A VM on such a network would need
# the same; on an ordinary network neither exists and nothing is copied.
#
# Took 2.5 to 4 minutes here (163-225 s: setup.sh's apt and pip 1.5-2 minutes of it, committing
# the provisioned container about 45 s, the demo twice under 10 s); 20 s more to bootstrap the base.
# Not part of the test suite. Needs root, podman, mmdebstrap (installed if missing, as
# build-image.sh does).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"
vf="$here/vagrant/Vagrantfile"
rebuild_base=
for arg in "$@"; do
  case "$arg" in
    --rebuild-base) rebuild_base=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "check-vagrant: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done

t0=$(date +%s)
say() { echo "check-vagrant: $*"; }
die() { echo "check-vagrant: $*" >&2; exit 2; }
[ "$(id -u)" = 0 ] || die "run as root (mmdebstrap, podman)."
[ -f "$vf" ] || die "no $vf"

# --- what the Vagrantfile says ----------------------------------------------------------------
box=$(sed -n 's/^[[:space:]]*config\.vm\.box[[:space:]]*=[[:space:]]*"\([^"]*\)".*/\1/p' "$vf" | head -n 1)
release=$(sed -n 's|^debian/\([a-z]*\)64$|\1|p' <<<"$box")
[ -n "$release" ] || die "the Vagrantfile's box \"$box\" is not a debian/<release>64 box."
dest=$(sed -n 's/.*synced_folder[[:space:]]*"[^"]*",[[:space:]]*"\([^"]*\)".*/\1/p' "$vf" | head -n 1)
[ -n "$dest" ] || die "no synced_folder target in the Vagrantfile."
excludes=()
while read -r pat; do
  [ -n "$pat" ] && excludes+=("--exclude=${pat%/}")
done < <(grep -o 'rsync__exclude:[^]]*' "$vf" | grep -o '"[^"]*"' | tr -d '"')
cpus=$(sed -n 's/^[[:space:]]*vb\.cpus[[:space:]]*=[[:space:]]*\([0-9]*\).*/\1/p' "$vf" | head -n 1)
mem=$(sed -n 's/^[[:space:]]*vb\.memory[[:space:]]*=[[:space:]]*\([0-9]*\).*/\1/p' "$vf" | head -n 1)
provision=$(sed -n '/<<-SHELL/,/^[[:space:]]*SHELL[[:space:]]*$/p' "$vf" | sed '1d;$d')
[ -n "$provision" ] || die "no inline provisioning script (<<-SHELL ... SHELL) in the Vagrantfile."
say "Vagrantfile: box $box (Debian $release), repo at $dest, ${cpus:-?} CPUs, ${mem:-?} MiB," \
    "excludes ${excludes[*]#--exclude=}"

# --- tools --------------------------------------------------------------------------------------
missing=()
for tool in podman runc mmdebstrap; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing ${missing[*]}"
  timeout 600 apt-get update -qq
  DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

rand=$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')
work=$(mktemp -d /tmp/check-vagrant.XXXXXX)
setup_ctr="check-vagrant-$rand-setup"
demo_ctr="check-vagrant-$rand-demo"
tmp_image="localhost/check-vagrant-$rand:provisioned"
results=()
failed=0
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if podman container exists "$demo_ctr" 2>/dev/null; then
    # The lab's namespaces live in this container's mount namespace; removing the container ends
    # them too. `lab down --all` first is only for tidiness.
    timeout 60 podman exec "$demo_ctr" bpftrace-hostport lab down --all >/dev/null 2>&1 || true
  fi
  for c in "$demo_ctr" "$setup_ctr"; do
    timeout 60 podman rm -f -t 0 "$c" >/dev/null 2>&1 || true
  done
  timeout 120 podman rmi -f "$tmp_image" >/dev/null 2>&1 || true
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# step NAME PASS|FAIL|SKIP DETAIL
step() {
  printf 'check-vagrant: %-4s %-10s %s\n' "$2" "$1" "$3"
  results+=("$1 $2")
  [ "$2" != FAIL ] || failed=1
}
show_tail() { tail -n "${2:-25}" "$1" | sed 's/^/    | /'; }
since() { echo "$(( $(date +%s) - $1 ))s"; }

# --- base image ---------------------------------------------------------------------------------
. /etc/os-release
host_release=${VERSION_CODENAME:-}
base="localhost/$release-base"       # build-image.sh's base is localhost/bookworm-base
s0=$(date +%s)
if [ -n "$rebuild_base" ] || ! podman image exists "$base"; then
  # This machine's Debian sources (deb822 or one-line), only entries for this machine's release
  # and its -updates/-security suites, renamed to the box's release.
  python3 - "$host_release" "$release" >"$work/sources.list" <<'EOF' || die "could not derive apt sources for $release"
import glob, os, re, sys
host, want = sys.argv[1:]
files = [f for f in ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list"))
         + sorted(glob.glob("/etc/apt/sources.list.d/*.sources")) if os.path.isfile(f)]
entries = []
for f in files:
    text = open(f).read()
    if f.endswith(".sources"):
        for stanza in re.split(r"\n\s*\n", text):
            fields, key = {}, None
            for line in stanza.splitlines():
                if line.startswith("#") or not line.strip():
                    continue
                if line[0].isspace() and key:
                    fields[key] += " " + line.strip()
                    continue
                key, _, value = line.partition(":")
                key = key.strip().lower()
                fields[key] = value.strip()
            if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes") == "no":
                continue
            for uri in fields.get("uris", "").split():
                for suite in fields.get("suites", "").split():
                    entries.append((fields.get("signed-by"), uri, suite, fields.get("components", "")))
    else:
        for line in text.splitlines():
            m = re.match(r"\s*deb\s+(\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s*(.*)", line)
            if m:
                opts = re.search(r"signed-by=(\S+?)\]?(\s|$)", m.group(1) or "")
                entries.append((opts.group(1) if opts else None, m.group(2), m.group(3), m.group(4)))
out = []
for signed, uri, suite, comps in entries:
    if suite != host and not suite.startswith(host + "-"):
        continue        # another distribution's repository
    opt = f"[signed-by={signed}] " if signed else ""
    out.append(f"deb {opt}{uri} {want}{suite[len(host):]} {comps}".rstrip())
if not out:
    sys.exit(f"no {host} entries in {files}")
print("\n".join(out))
EOF
  say "bootstrapping $base (mmdebstrap --variant=minbase $release) from:"
  sed 's/^/    /' "$work/sources.list"
  if timeout 900 mmdebstrap --variant=minbase --format=tar "$release" "$work/base.tar" "$work/sources.list" \
       >"$work/mmdebstrap.log" 2>&1 \
     && timeout 300 podman import --quiet "$work/base.tar" "$base" >/dev/null; then
    step base PASS "$base bootstrapped in $(since "$s0")"
  else
    show_tail "$work/mmdebstrap.log"
    step base FAIL "mmdebstrap or podman import failed"
  fi
  rm -f "$work/base.tar"
else
  step base PASS "$base already built (reused; --rebuild-base bootstraps it again)"
fi

# --- setup.sh, unprivileged ----------------------------------------------------------------------
if [ "$failed" = 0 ]; then
  s0=$(date +%s)
  timeout 120 podman run -d --name "$setup_ctr" --network host "$base" sleep infinity >/dev/null \
    || die "podman run of $base failed"
  timeout 60 podman exec "$setup_ctr" mkdir -p "$dest" /usr/local/share/ca-certificates
  tar -C "$here" "${excludes[@]}" -cf - . | timeout 300 podman exec -i "$setup_ctr" tar -C "$dest" -xf - \
    || die "copying the repository into the container failed"
  say "repository copied to $dest ($(timeout 60 podman exec "$setup_ctr" du -sh "$dest" | cut -f1)), not mounted"
  site=()
  for f in /usr/local/share/ca-certificates/*.crt /etc/pip.conf; do
    [ -f "$f" ] || continue
    timeout 60 podman cp "$f" "$setup_ctr:$f" || die "podman cp $f failed"
    site+=("$f")
  done
  [ "${#site[@]}" = 0 ] || say "site configuration copied into the container: ${site[*]}"
  if timeout 1200 podman exec -w "$dest" "$setup_ctr" bash scripts/setup.sh >"$work/setup.log" 2>&1; then
    sed 's/^/    | /' "$work/setup.log"
    # What the VM would have afterwards: headers link, bcc in the venv, the command on PATH.
    timeout 120 podman exec -w "$dest" "$setup_ctr" bash -c '
        set -e
        echo "headers: /lib/modules/$(uname -r)/build -> $(readlink -f /lib/modules/$(uname -r)/build)"
        .venv/bin/python -c "import bcc, sys; print(\"venv: python\", sys.version.split()[0], \"imports bcc\")"
        echo "PATH: $(command -v bpftrace-hostport): $(bpftrace-hostport --version)"
        . /etc/os-release; echo "release: $PRETTY_NAME"' >"$work/after-setup.log" 2>&1 \
      && ok_after=1 || ok_after=
    sed 's/^/    | /' "$work/after-setup.log"
    if [ -n "$ok_after" ]; then
      step setup.sh PASS "bash scripts/setup.sh in $(since "$s0") (unprivileged container)"
    else
      step setup.sh FAIL "setup.sh exited 0 but the result is incomplete (above)"
    fi
  else
    show_tail "$work/setup.log" 40
    step setup.sh FAIL "bash scripts/setup.sh failed after $(since "$s0")"
  fi
  if [ "$failed" = 0 ]; then
    s0=$(date +%s)
    if timeout 600 podman commit --quiet "$setup_ctr" "$tmp_image" >/dev/null; then
      say "provisioned container committed as $tmp_image in $(since "$s0") (removed at the end)"
    else
      step setup.sh FAIL "podman commit failed"
    fi
  fi
  timeout 60 podman rm -f -t 0 "$setup_ctr" >/dev/null 2>&1 || true
else
  step setup.sh SKIP "no base image"
fi

# --- demo.sh and the Vagrantfile's provisioning, privileged ---------------------------------------
host_netns_before=$(ls /run/netns 2>/dev/null | sort || true)
demo_prefixes=()
if [ "$failed" = 0 ]; then
  limits=()
  [ -z "$cpus" ] || limits+=(--cpus "$cpus")
  [ -z "$mem" ] || limits+=(--memory "${mem}m")
  timeout 120 podman run -d --name "$demo_ctr" --privileged --network host "${limits[@]}" \
      "$tmp_image" sleep infinity >/dev/null || die "podman run --privileged of $tmp_image failed"
  inside=$(podman exec "$demo_ctr" sh -c 'ls /run/netns 2>/dev/null | wc -l')
  on_host=$(printf '%s\n' "$host_netns_before" | grep -c . || true)
  if [ "$inside" = 0 ]; then
    say "the container's /var/run/netns starts empty ($on_host named namespaces on the host): it is its own"
  else
    step netns FAIL "the container already sees $inside namespaces in /var/run/netns: not private"
  fi

  for what in demo.sh provision; do
    [ "$failed" = 0 ] || { step "$what" SKIP "an earlier step failed"; continue; }
    s0=$(date +%s)
    if [ "$what" = demo.sh ]; then
      cmd=(podman exec -w "$dest" "$demo_ctr" bash scripts/demo.sh)
    else
      cmd=(podman exec "$demo_ctr" bash -c "$provision")
    fi
    if timeout 600 "${cmd[@]}" >"$work/$what.log" 2>&1; then
      # demo.sh's output in full; the provisioning's (the same demo again) only its steps.
      if [ "$what" = demo.sh ]; then
        sed 's/^/    | /' "$work/$what.log"
      else
        grep -E '^setup: |^\[[0-9]/[0-9]\] |demo took' "$work/$what.log" | sed 's/^/    | /'
      fi
      if grep -q 'flows traced' "$work/$what.log" && grep -q 'lab demo removed' "$work/$what.log" \
         && ! grep -q 'installing' "$work/$what.log"; then
        step "$what" PASS "$(grep -m1 -o '[0-9]* flows traced' "$work/$what.log"), $(grep -o 'demo took .*' "$work/$what.log"); setup a no-op; $(since "$s0") in all"
      else
        step "$what" FAIL "exited 0 but without the demo's flows, its clean-up, or setup installed again"
      fi
    else
      show_tail "$work/$what.log" 40
      step "$what" FAIL "exited non-zero after $(since "$s0")"
    fi
    while read -r p; do demo_prefixes+=("$p"); done \
      < <(grep -o 'netns bhp-[a-z0-9-]*-node' "$work/$what.log" | sed 's/^netns //; s/node$//')
  done

  left=$(timeout 60 podman exec "$demo_ctr" sh -c 'ip netns list; ls /run/bpftrace-hostport/labs 2>/dev/null' || echo "(could not look)")
  timeout 60 podman rm -f -t 0 "$demo_ctr" >/dev/null 2>&1 || true
  host_netns_after=$(ls /run/netns 2>/dev/null | sort || true)
  leaked=()
  for p in "${demo_prefixes[@]}"; do
    while read -r n; do [ -n "$n" ] && leaked+=("$n"); done < <(printf '%s\n' "$host_netns_after" | grep "^$p" || true)
  done
  if [ -n "$left" ]; then
    step netns FAIL "left in the container after the demo: $(echo $left)"
  elif [ "${#leaked[@]}" -gt 0 ]; then
    step netns FAIL "the demo's namespaces appeared on the host: ${leaked[*]}"
  elif [ "${#demo_prefixes[@]}" = 0 ]; then
    step netns SKIP "no demo ran"
  else
    step netns PASS "demo namespaces ${demo_prefixes[*]/%/*} gone with the container; none on the host"
  fi
else
  step demo.sh SKIP "setup.sh did not pass"
  step provision SKIP "setup.sh did not pass"
fi

say "summary: ${results[*]} ($(since "$t0") in all)"
say "not checked here (needs a VM): Vagrant and its provider, the box's own kernel (the exact" \
    "linux-headers-\$(uname -r) branch of setup.sh; here the fallback headers are used), systemd as PID 1."
exit "$failed"
