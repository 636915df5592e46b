#!/usr/bin/env bash
# Boot the Vagrant VM for real and run the class demo in it: vagrant/Vagrantfile, unchanged, with
# vagrant-libvirt on QEMU (KVM where /dev/kvm works, TCG otherwise).
#
#   bash scripts/check-vagrant-vm.sh
#   bash scripts/check-vagrant-vm.sh --rebuild-box     # build the box again even if cached
#   bash scripts/check-vagrant-vm.sh --box-only        # build (or reuse) the box, then stop
#   bash scripts/check-vagrant-vm.sh --accel tcg       # auto (default), kvm or tcg
#
# Steps, each timed:
#   tools      Debian's vagrant, vagrant-libvirt, libvirt-daemon-system, qemu-system-x86,
#              qemu-utils, mmdebstrap, dnsmasq-base, rsync: installed when missing (no
#              recommends, no service started by the install).
#   box        a local debian/trixie64 box, cached in $BHP_VM_CACHE (default
#              /var/cache/bpftrace-hostport/vagrant-vm) and rebuilt only when its recipe
#              changes: mmdebstrap --variant=minbase of trixie with the kernel, systemd, ssh,
#              sudo, rsync, python3, iproute2, ca-certificates; scripts/vagrant-vm/box-customize.sh
#              adds the vagrant user, DHCP and fstab; an ext4 image made with `mke2fs -d` (no loop
#              device), qcow2 by qemu-img; the box's Vagrantfile (scripts/vagrant-vm/box.Vagrantfile)
#              boots its kernel directly. Added to the check's own VAGRANT_HOME, so a
#              `debian/trixie64` the user has in ~/.vagrant.d is neither used nor replaced.
#   accel      KVM if the box's kernel, booted by QEMU with -accel kvm, reaches its initrd's
#              /init; else TCG (about 10x slower). A nested KVM may run firmware and still fail
#              on the kernel, as this machine's does (KVM internal error: emulation failure).
#   libvirt    libvirtd and virtlogd in a network namespace of their own (bhp-vm-<random>,
#              entered with nsenter --net: `ip netns exec` would remount /sys and hide the
#              cgroups) and a private mount namespace: a tmpfs on /run, and /etc/libvirt,
#              /var/lib/libvirt, /var/log/libvirt bound to the run's work directory, so no
#              libvirt state of the machine is read or written. vagrant-libvirt's management
#              network, its dnsmasq and the guest all live in that namespace.
#   proxy      scripts/vagrant-vm/proxy.py: listens in that namespace (it has no route out),
#              connects from the root namespace, serves only the package registries (apt's
#              Debian mirror, PyPI) on ports 80 and 443.
#   up         `vagrant up --no-provision` in that namespace: the box, the rsync synced folder.
#   provision  `vagrant provision`: first scripts/vagrant-vm/site.Vagrantfile's two provisioners
#              (this machine's CA certificates; apt and pip pointed at the proxy), then
#              vagrant/Vagrantfile's inline script as users run it (scripts/setup.sh, then the
#              demo once). Checked: setup.sh installed the exact linux-headers-$(uname -r) of
#              the box's kernel (not the fallback) and the provisioning demo ran to its end.
#   demo       README's `vagrant ssh -c 'sudo bpftrace-hostport lab demo'`. Checked: every
#              request through a hostPort traced as a flow (the count equals the DNATed requests
#              sent, none failed, 0 lost events), the netfilter backend (no fall-back to
#              conntrack; flows via prerouting and output with latencies; misses counted for
#              the hostNetwork port), the summary table, check's hostnetwork-hostport finding,
#              the lab removed; and in the guest: kernel >= 6.4 with BTF, no lab namespace left.
#   destroy    `vagrant destroy -f`; checked: no domain left in the check's libvirt.
#   teardown   libvirt's networks destroyed, libvirtd, virtlogd, dnsmasq and the proxy stopped
#              by their ids, the namespace deleted, the work directory removed.
#   network    the root namespace before vs after: links, addresses, routes and rules (v4/v6,
#              all tables), the nftables ruleset (iptables-nft included), legacy iptables when
#              loaded, every net.* sysctl; and no bhp-vm namespace left.
# The teardown runs on every exit path (trap), also after a failure or Ctrl-C. Exit 0 only when
# every step passed. Measured here (2 cores shared with other work, TCG): see README "Checks
# outside the test suite". Not part of the test suite. Needs root.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
helpers="$here/scripts/vagrant-vm"
vf="$here/vagrant/Vagrantfile"
cache=${BHP_VM_CACHE:-/var/cache/bpftrace-hostport/vagrant-vm}
registries=${BHP_VM_REGISTRIES:-deb.debian.org,security.debian.org,pypi.org,files.pythonhosted.org}
proxy_port=3128
suite=trixie
box_name=debian/trixie64
box_pkgs=(linux-image-amd64 initramfs-tools systemd systemd-sysv udev dbus openssh-server sudo
          passwd rsync python3 iproute2 ca-certificates)
mirrors=("deb http://deb.debian.org/debian $suite main"
         "deb http://deb.debian.org/debian $suite-updates main"
         "deb http://deb.debian.org/debian-security $suite-security main")
tools=(vagrant vagrant-libvirt libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils
       mmdebstrap dnsmasq-base e2fsprogs rsync openssh-client iproute2)

rebuild_box= box_only= accel=auto
while [ $# -gt 0 ]; do
  case "$1" in
    --rebuild-box) rebuild_box=1 ;;
    --box-only) box_only=1 ;;
    --accel) shift; accel=${1:-} ;;
    --accel=*) accel=${1#--accel=} ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "check-vagrant-vm: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$accel" in auto|kvm|tcg) ;; *) echo "check-vagrant-vm: --accel takes auto, kvm or tcg" >&2; exit 2 ;; esac

say() { echo "check-vagrant-vm: $*"; }
die() { echo "check-vagrant-vm: $*" >&2; exit 2; }
[ "$(id -u)" = 0 ] || die "run as root (sudo bash $0): it installs packages and runs libvirtd."
[ -f "$vf" ] || die "no $vf"

# --- steps and their timings ----------------------------------------------------------------------
t_start=$(date +%s)
results=()      # "name|PASS|seconds|detail"
failed=0
cur_step= cur_t0=
begin() { cur_step=$1; cur_t0=$(date +%s); say "--- $1: $2"; }
# finish PASS|FAIL|SKIP DETAIL: ends the current step
finish() {
  local secs=$(( $(date +%s) - cur_t0 ))
  printf 'check-vagrant-vm: %-4s %-10s %4ss  %s\n' "$1" "$cur_step" "$secs" "$2"
  results+=("$cur_step|$1|$secs|$2")
  [ "$1" != FAIL ] || failed=1
  cur_step=
}
skip() { results+=("$1|SKIP|0|$2"); printf 'check-vagrant-vm: SKIP %-10s        %s\n' "$1" "$2"; }
show_tail() { [ ! -f "$1" ] || tail -n "${2:-30}" "$1" | sed 's/^/    | /' || true; }
summary() {
  say "timings (TCG or KVM: $drv_label; $(( $(date +%s) - t_start )) s in all):"
  local r name st secs detail
  for r in "${results[@]}"; do
    IFS='|' read -r name st secs detail <<<"$r"
    printf '    %-10s %-4s %5s s  %s\n' "$name" "$st" "$secs" "$detail"
  done
}
drv_label=undecided

# --- the root namespace's network, to compare before and after ------------------------------------
net_snapshot() {
  echo "## links"; ip -d -o link show | sed -E 's/\\ +/ /g'
  echo "## addresses"; ip -o addr show | sed -E 's/ +valid_lft.*//'
  echo "## routes"; ip -4 route show table all; ip -6 route show table all | sed -E 's/ expires [0-9]+sec//'
  echo "## rules"; ip -4 rule show; ip -6 rule show
  echo "## nftables"; nft list ruleset 2>&1
  local fam
  for fam in ip ip6; do
    if [ -s "/proc/net/${fam}_tables_names" ]; then
      echo "## legacy ${fam}tables"
      if [ "$fam" = ip ]; then iptables-legacy-save 2>&1; else ip6tables-legacy-save 2>&1; fi | grep -v '^#'
    fi
  done
  echo "## sysctl net.*"; sysctl -a 2>/dev/null | grep '^net\.' | grep -v '^net\.netfilter\.nf_conntrack_count'
}

# --- work directory, namespace, clean-up on every exit path ---------------------------------------
rand=$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')
ns="bhp-vm-$rand"
work=$(mktemp -d /var/tmp/bhp-vm.XXXXXX)
L="$work/libvirt"
uri="qemu:///system?socket=$L/sock/libvirt-sock"
export VAGRANT_HOME="$cache/vagrant.d"
export VAGRANT_DOTFILE_PATH="$work/dotvagrant"
export VAGRANT_CWD="$here/vagrant"
export VAGRANT_DEFAULT_PROVIDER=libvirt VAGRANT_CHECKPOINT_DISABLE=1 VAGRANT_BOX_UPDATE_CHECK_DISABLE=1
export VAGRANT_NO_COLOR=1
export BHP_VM_LIBVIRT_URI="$uri" BHP_VM_PREFIX="$ns-"
export BHP_VM_SITE_CA_DIR="$work/site-ca" BHP_VM_SITE_SCRIPT="$helpers/site-provision.sh"
export BHP_VM_PROXY_PORT=$proxy_port BHP_VM_DRIVER=qemu
export BHP_VM_KVM_MODEL=kvm64 BHP_VM_KVM_OFF=pni    # the CPU under KVM (site.Vagrantfile)
site_vf="$VAGRANT_HOME/Vagrantfile"
made_policy_rc=
launcher_pid= proxy_pid= torn_down= vm_created=
virsh_() { timeout 60 virsh -q -c "$uri" "$@"; }
in_ns=(nsenter --net="/run/netns/$ns")    # vagrant and its ssh/rsync run beside the guest

stop_pid() {    # stop_pid PID [NAME]: TERM, up to 15 s, then KILL
  local pid=$1 i
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
  say "${2:-process} $pid did not stop on SIGTERM; killing it"
  kill -KILL "$pid" 2>/dev/null || true
}

teardown() {
  [ -z "$torn_down" ] || return 0
  torn_down=1
  local left=() pid n
  if [ -n "$vm_created" ] && [ -S "$L/sock/libvirt-sock" ]; then
    timeout 300 "${in_ns[@]}" vagrant destroy -f >>"$work/destroy.log" 2>&1 || true
  fi
  if [ -S "$L/sock/libvirt-sock" ]; then
    for n in $(virsh_ list --all --name 2>/dev/null); do
      virsh_ destroy "$n" >/dev/null 2>&1 || true
      virsh_ undefine --nvram "$n" >/dev/null 2>&1 || virsh_ undefine "$n" >/dev/null 2>&1 || true
    done
    for n in $(virsh_ net-list --all --name 2>/dev/null); do
      virsh_ net-destroy "$n" >/dev/null 2>&1 || true
      virsh_ net-undefine "$n" >/dev/null 2>&1 || true
    done
  fi
  stop_pid "$(cat "$L/libvirtd.pid" 2>/dev/null)" libvirtd
  stop_pid "$(cat "$L/virtlogd.pid" 2>/dev/null)" virtlogd
  stop_pid "$proxy_pid" proxy
  # Whatever else still runs in the namespace (dnsmasq, a qemu) was started by this run's libvirtd.
  if [ -e "/run/netns/$ns" ]; then
    for pid in $(ip netns pids "$ns" 2>/dev/null); do left+=("$pid"); done
    if [ "${#left[@]}" -gt 0 ]; then
      say "stopping what is left in $ns: $(for p in "${left[@]}"; do printf '%s(%s) ' "$p" "$(cat /proc/$p/comm 2>/dev/null)"; done)"
      for pid in "${left[@]}"; do stop_pid "$pid"; done
    fi
    ip netns del "$ns" 2>/dev/null || true
  fi
  stop_pid "$launcher_pid" launcher
  [ -z "$launcher_pid" ] || wait "$launcher_pid" 2>/dev/null || true
  rm -f "$site_vf"
  [ -z "$made_policy_rc" ] || rm -f /usr/sbin/policy-rc.d
  # mmdebstrap unmounts its own; the private mount namespace went with its last process.
  if grep -q " $work" /proc/self/mounts; then
    grep " $work" /proc/self/mounts | awk '{ print $2 }' | sort -r | xargs -r -n1 umount -l || true
  fi
  rm -rf "$work"
}
on_exit() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -z "$torn_down" ]; then
    [ -z "$cur_step" ] || finish FAIL "interrupted or failed (exit $rc)"
    say "cleaning up after a failure"
    teardown
  fi
  exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- tools ---------------------------------------------------------------------------------------
begin tools "Debian packages"
missing=()
for p in "${tools[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing ${missing[*]}"
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    # Installing libvirt must not start a libvirtd in the root namespace.
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; made_policy_rc=1
  fi
  timeout 600 apt-get update -qq
  DEBIAN_FRONTEND=noninteractive timeout 1200 apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >"$work/apt.log" 2>&1 || { show_tail "$work/apt.log"; die "apt-get install failed"; }
  [ -z "$made_policy_rc" ] || { rm -f /usr/sbin/policy-rc.d; made_policy_rc=; }
  finish PASS "installed ${missing[*]}"
else
  finish PASS "all present: vagrant $(dpkg-query -W -f='${Version}' vagrant), vagrant-libvirt $(dpkg-query -W -f='${Version}' vagrant-libvirt), libvirt $(dpkg-query -W -f='${Version}' libvirt-daemon-system), qemu $(dpkg-query -W -f='${Version}' qemu-system-x86)"
fi
net_snapshot >"$work/net-before.txt"

# --- box -----------------------------------------------------------------------------------------
begin box "$box_name built locally (cached)"
pubkey=$(ls /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub 2>/dev/null | sort -V | tail -n 1)
[ -n "$pubkey" ] || die "the vagrant package ships no keys/vagrant.pub (Vagrant's insecure public key)."
recipe=$( { echo "$suite ${box_pkgs[*]}"; printf '%s\n' "${mirrors[@]}"; cat "$helpers/box-customize.sh" \
            "$helpers/box.Vagrantfile" "$pubkey"; } | sha256sum | cut -c1-16)
mkdir -p "$VAGRANT_HOME"
have=$(cat "$cache/box.stamp" 2>/dev/null || true)
if [ -z "$rebuild_box" ] && [ "$have" = "$recipe" ] && vagrant box list 2>/dev/null | grep -q "^$box_name *(libvirt"; then
  finish PASS "reused $box_name from $VAGRANT_HOME (recipe $recipe; --rebuild-box builds it again)"
else
  b="$work/box"; mkdir -p "$b/out"
  say "mmdebstrap --variant=minbase $suite with ${box_pkgs[*]}"
  if ! timeout 1800 mmdebstrap --variant=minbase --format=directory --include="$(IFS=,; echo "${box_pkgs[*]}")" \
        --customize-hook="env BHP_BOX_PUBKEY='$pubkey' BHP_BOX_OUT='$b/out' sh '$helpers/box-customize.sh' \"\$1\"" \
        "$suite" "$b/rootfs" "${mirrors[@]}" >"$work/mmdebstrap.log" 2>&1; then
    show_tail "$work/mmdebstrap.log"; die "mmdebstrap failed (log above)"
  fi
  kver=$(ls "$b/rootfs/lib/modules" | sort -V | tail -n 1)
  say "root file system $(du -sh "$b/rootfs" | cut -f1), kernel $kver; ext4 image (mke2fs -d), then qcow2"
  truncate -s 20G "$b/root.raw"
  mke2fs -q -F -t ext4 -L root -d "$b/rootfs" "$b/root.raw" || die "mke2fs -d failed"
  rm -rf "$b/rootfs"
  qemu-img convert -f raw -O qcow2 "$b/root.raw" "$b/out/box.img" || die "qemu-img convert failed"
  rm -f "$b/root.raw"
  printf '{"provider": "libvirt", "format": "qcow2", "virtual_size": 20}\n' >"$b/out/metadata.json"
  cp "$helpers/box.Vagrantfile" "$b/out/Vagrantfile"
  tar -C "$b/out" -cf "$b/trixie64.box" metadata.json Vagrantfile box.img vmlinuz initrd.img
  rm -rf "$b/out"
  timeout 600 vagrant box add --force --name "$box_name" "$b/trixie64.box" >"$work/box-add.log" 2>&1 \
    || { show_tail "$work/box-add.log"; die "vagrant box add failed"; }
  rm -f "$b/trixie64.box"
  echo "$recipe" >"$cache/box.stamp"
  finish PASS "built $box_name (kernel $kver, recipe $recipe) into $VAGRANT_HOME"
fi
# --- accel (with the box's kernel) -----------------------------------------------------------
begin accel "KVM or TCG"
# The box's own kernel booted with -accel kvm up to its first user-space process (/init in
# the initrd): a nested KVM can run firmware and still fail on the kernel ("KVM internal error",
# emulation failure), as this machine's does.
kvm_probe() {    # prints why not when KVM is unusable
  [ -c /dev/kvm ] || { echo "no /dev/kvm"; return 1; }
  local out="$work/kvm-probe.log" boxdir pid i
  boxdir="$VAGRANT_HOME/boxes/${box_name//\//-VAGRANTSLASH-}/0/libvirt"
  qemu-system-x86_64 -accel kvm -cpu "$BHP_VM_KVM_MODEL$(printf ',%s=off' $BHP_VM_KVM_OFF)" \
    -m 1024 -smp 2 -nodefaults -display none -no-reboot -serial "file:$out" \
    -kernel "$boxdir/vmlinuz" -initrd "$boxdir/initrd.img" \
    -append "console=ttyS0 panic=-1 root=/dev/bhp-none" </dev/null >"$out.err" 2>&1 &
  pid=$!
  for i in $(seq 1 300); do
    grep -qs 'Run /init as init process' "$out" && break
    grep -qs 'KVM internal error' "$out.err" && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  grep -qs 'Run /init as init process' "$out" && return 0
  if grep -qs 'KVM internal error' "$out.err"; then
    echo "KVM internal error booting the box's kernel: $(grep -m1 -iE 'emulation failure|suberror' "$out.err")"
  else
    echo "the box's kernel did not reach /init in 60 s ($(grep -v '^$' "$out.err" | head -n 1))"
  fi
  return 1
}
case "$accel" in
  tcg) BHP_VM_DRIVER=qemu; finish PASS "TCG (asked for)" ;;
  kvm) BHP_VM_DRIVER=kvm; finish PASS "KVM (asked for)" ;;
  auto)
    if why=$(kvm_probe); then BHP_VM_DRIVER=kvm; finish PASS "KVM: the box's kernel booted with -accel kvm"
    else BHP_VM_DRIVER=qemu; finish PASS "TCG: KVM unusable here (${why:-no answer})"; fi ;;
esac
drv_label=$([ "$BHP_VM_DRIVER" = kvm ] && echo KVM || echo TCG)

if [ -n "$box_only" ]; then
  torn_down=1; rm -rf "$work"; summary; exit "$failed"
fi

# --- libvirt in a namespace of its own -----------------------------------------------------------
begin libvirt "libvirtd and virtlogd in netns $ns"
ip netns add "$ns"
ip -n "$ns" link set lo up
mkdir -p "$L"/{etc,lib/images,log,sock} "$cache/libvirt-cache" "$BHP_VM_SITE_CA_DIR"
cat >"$L/etc/libvirtd.conf" <<EOF
unix_sock_dir = "$L/sock"
unix_sock_ro_perms = "0700"
unix_sock_rw_perms = "0700"
auth_unix_ro = "none"
auth_unix_rw = "none"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
EOF
# QEMU as root (no /dev/kvm group, no chown of the box's kernel); no per-domain cgroups or mount
# namespaces, so nothing is made outside this run's own directories.
cat >"$L/etc/qemu.conf" <<'EOF'
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
EOF
echo 'log_outputs = "3:file:/var/log/libvirt/virtlogd.log"' >"$L/etc/virtlogd.conf"
cat >"$L/launch.sh" <<EOF
set -e
mount -t tmpfs -o mode=0755 bhp-vm-run /run
mkdir -p /run/libvirt /run/lock
mount --bind '$L/etc' /etc/libvirt
mount --bind '$L/lib' /var/lib/libvirt
mount --bind '$L/log' /var/log/libvirt
mount --bind '$cache/libvirt-cache' /var/cache/libvirt
virtlogd & echo \$! >'$L/virtlogd.pid'
libvirtd & echo \$! >'$L/libvirtd.pid'
wait
EOF
for d in /etc/libvirt /var/lib/libvirt /var/log/libvirt /var/cache/libvirt; do
  [ -d "$d" ] || die "no $d: is libvirt-daemon-system installed?"
done
setsid nsenter --net="/run/netns/$ns" unshare --mount --propagation private -- bash "$L/launch.sh" \
  >"$L/launch.log" 2>&1 </dev/null &
launcher_pid=$!
ok=
for i in $(seq 1 120); do
  if [ -S "$L/sock/libvirt-sock" ] && virsh_ version >/dev/null 2>&1; then ok=1; break; fi
  kill -0 "$launcher_pid" 2>/dev/null || break
  sleep 0.5
done
if [ -z "$ok" ]; then
  show_tail "$L/launch.log"; show_tail "$L/log/libvirtd.log"; finish FAIL "libvirtd did not answer"; exit 1
fi
finish PASS "$(virsh_ version | sed -n 's/^Using library: //p; s/^Running hypervisor: //p' | paste -sd' '), socket in $L/sock"

# --- proxy ---------------------------------------------------------------------------------------
begin proxy "registries only, from the root namespace"
python3 "$helpers/proxy.py" --netns "/run/netns/$ns" --port "$proxy_port" --allow "$registries" \
  --log "$work/proxy.log" --ready-file "$work/proxy.ready" </dev/null >"$work/proxy.out" 2>&1 &
proxy_pid=$!
for i in $(seq 1 40); do [ -s "$work/proxy.ready" ] && break; kill -0 "$proxy_pid" 2>/dev/null || break; sleep 0.25; done
[ -s "$work/proxy.ready" ] || { cat "$work/proxy.out"; finish FAIL "the proxy did not start"; exit 1; }
for c in /usr/local/share/ca-certificates/*.crt; do [ -f "$c" ] && cp "$c" "$BHP_VM_SITE_CA_DIR/"; done
cas=$(ls "$BHP_VM_SITE_CA_DIR" | grep -c . || true)
finish PASS "port $proxy_port in $ns for $registries; $cas site CA certificate(s) for the guest"

# --- up, provision, demo, destroy ----------------------------------------------------------------
cp "$helpers/site.Vagrantfile" "$site_vf"
# vagrant OUTPUT... with seconds since the step began in front of each line, kept in a log.
stamped() {
  local log=$1 t0 line; shift; t0=$(date +%s)
  set +e
  "$@" 2>&1 | while IFS= read -r line; do
    line=${line//$'\e[K'/}
    case "$line" in *"Progress: "*) line=$(sed -E 's/.*Progress: [0-9]+%//' <<<"$line") ;; esac
    [ -n "$line" ] || continue
    printf '    | %4ss %s\n' "$(( $(date +%s) - t0 ))" "$line"
  done | tee "$log"
  local rc=${PIPESTATUS[0]}
  set -e
  return "$rc"
}

begin up "vagrant up --no-provision ($drv_label; $box_name, $(grep -o 'cpus = [0-9]*' "$vf" | tail -n 1), $(grep -o 'memory = [0-9]*' "$vf" | tail -n 1) MiB)"
vm_created=1
if stamped "$work/up.log" timeout 1200 "${in_ns[@]}" vagrant up --provider libvirt --no-provision; then
  finish PASS "booted, ssh up, synced folder rsynced"
else
  say "libvirt's log of the domain, last lines:"; show_tail "$(ls "$L"/log/qemu/*.log 2>/dev/null | head -n 1)" 20
  finish FAIL "vagrant up failed"
fi

if [ "$failed" = 0 ]; then
  begin provision "vagrant provision: site settings, then vagrant/Vagrantfile's inline script"
  if stamped "$work/provision.log" timeout 3600 "${in_ns[@]}" vagrant provision; then
    facts=$(timeout 120 "${in_ns[@]}" vagrant ssh -c 'k=$(uname -r); echo "kernel $k"; echo "build $(readlink -f /lib/modules/$k/build)"; test -e /sys/kernel/btf/vmlinux && echo btf' 2>/dev/null | tr -d '\r')
    kver=$(sed -n 's/^kernel //p' <<<"$facts")
    build=$(sed -n 's/^build //p' <<<"$facts")
    site_s=$(awk '/Running provisioner: bhp-site /{a=$2} /Running provisioner: shell/{b=$2} END{sub("s","",a); sub("s","",b); if (a!="" && b!="") print b-a}' "$work/provision.log")
    why=()
    grep -q 'Running provisioner: bhp-site ' "$work/provision.log" || why+=("the site provisioner did not run")
    grep -q 'setup: ready' "$work/provision.log" || why+=("setup.sh did not finish")
    grep -q 'lab demo removed; demo took' "$work/provision.log" || why+=("the provisioning's demo did not finish")
    [ "$build" = "/usr/src/linux-headers-$kver" ] || why+=("headers: /lib/modules/$kver/build is $build, not linux-headers-$kver")
    grep -q '^btf$' <<<"$facts" || why+=("no /sys/kernel/btf/vmlinux")
    if [ "${#why[@]}" = 0 ]; then
      finish PASS "kernel $kver, exact headers $build, demo ran; site settings ${site_s:-?} s of it"
    else
      finish FAIL "$(IFS=';'; echo "${why[*]}")"
    fi
  else
    finish FAIL "vagrant provision failed"
  fi
else
  skip provision "vagrant up failed"
fi

if [ "$failed" = 0 ]; then
  begin demo "vagrant ssh -c 'sudo bpftrace-hostport lab demo'"
  if stamped "$work/demo.log" timeout 900 "${in_ns[@]}" vagrant ssh -c 'sudo bpftrace-hostport lab demo'; then
    tr -d '\r' <"$work/demo.log" | sed -E 's/^    \| +[0-9]+s //' >"$work/demo.txt"
    why=()
    verdict=$(python3 "$helpers/check_demo.py" "$work/demo.txt") || why+=("$verdict")
    left=$(timeout 120 "${in_ns[@]}" vagrant ssh -c 'sudo ip netns list' 2>/dev/null | tr -d '\r' | grep -c '^bhp-' || true)
    [ "$left" = 0 ] || why+=("$left lab namespace(s) left in the guest")
    if [ "${#why[@]}" = 0 ]; then
      finish PASS "$verdict"
    else
      finish FAIL "$(IFS=';'; echo "${why[*]}")"
    fi
  else
    finish FAIL "the demo exited non-zero"
  fi
else
  skip demo "an earlier step failed"
fi

begin destroy "vagrant destroy -f"
if timeout 600 "${in_ns[@]}" vagrant destroy -f >"$work/destroy.log" 2>&1; then
  doms=$(virsh_ list --all --name 2>/dev/null | grep -c . || true)
  if [ "$doms" = 0 ]; then
    vm_created=
    finish PASS "no domain left; networks then: $(virsh_ net-list --all --name 2>/dev/null | tr '\n' ' ')"
  else
    finish FAIL "$doms domain(s) left after vagrant destroy"
  fi
else
  show_tail "$work/destroy.log"; finish FAIL "vagrant destroy failed"
fi

# --- teardown and the root namespace's network ------------------------------------------------------
proxy_summary=$(awk '$3 == "CONNECT" || $3 == "GET" { n[$4 " " $5]++ } END { for (k in n) printf "%s x%d; ", k, n[k] }' \
                "$work/proxy.log" 2>/dev/null)
begin teardown "libvirt, dnsmasq, proxy, namespace, work directory"
cp "$work/net-before.txt" "/var/tmp/bhp-vm-$rand.net-before"
teardown
after_ns=$(ip netns list 2>/dev/null | grep -c "^$ns" || true)
left_pids=$(ps -eo pid=,args= | grep -F "$work" | grep -v grep | grep -c . || true)
if [ "$after_ns" = 0 ] && [ ! -d "$work" ] && [ "$left_pids" = 0 ] && [ ! -e "$site_vf" ]; then
  finish PASS "namespace $ns gone, no process of the run left, work directory removed"
else
  finish FAIL "left: namespace $after_ns, processes $left_pids, work dir $([ -d "$work" ] && echo yes || echo no)"
fi
say "proxy served: ${proxy_summary:-nothing}"

begin network "the root namespace before vs after"
before="/var/tmp/bhp-vm-$rand.net-before"
net_snapshot >"$before.after"
if diff -u "$before" "$before.after" >"$before.diff"; then
  finish PASS "links, addresses, routes, rules, nftables, net.* sysctls ($(wc -l <"$before") lines) unchanged; no $ns"
else
  sed 's/^/    | /' "$before.diff" | head -n 40
  finish FAIL "the root namespace's network changed (diff above)"
fi
rm -f "$before" "$before.after" "$before.diff"

summary
exit "$failed"
