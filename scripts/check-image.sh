#!/usr/bin/env bash
# Run the node agent image's entry point for real, the way deploy/daemonset.yaml runs it, against a
# lab instead of the host's own network namespace, and check what a cluster would see:
#
#   bash scripts/check-image.sh               # build the image if missing or stale, then both runs
#   bash scripts/check-image.sh --no-build    # test the image as it is
#   bash scripts/check-image.sh --privileged-only
#
# Steps: build the image with scripts/build-image.sh when it is missing or its package differs from
# this checkout; `lab up --scenario hostnetwork`; then, per run, the image's ENTRYPOINT (`agent`) in a
# host-network container with the DaemonSet's volume mounts (read from deploy/daemonset.yaml:
# /sys/kernel/btf, /sys/kernel/tracing, /lib/modules, /usr/src read-only; a recording directory
# from a temporary directory; /tmp as a 64 MiB tmpfs), its read-only root filesystem and memory
# limit, plus what tracing a lab needs: /var/run/netns and the lab's own state directory (read-only)
# and `--lab NAME`. From the host: lab traffic (20 requests to hostPort 8000, 3 to the hostNetwork
# pod's 9000), a scrape of /metrics and /healthz, SIGTERM (podman stop -t 30), the recording read
# back with `bpftrace-hostport report`. One line per check; exits 1 at the first failure.
#
# Two runs:
#   privileged - `--privileged`: does the entry point work at all.
#   caps       - the DaemonSet's securityContext: --cap-drop ALL and its capabilities.add,
#                no-new-privileges (allowPrivilegeEscalation: false), seccomp=unconfined,
#                PLUS CAP_SYS_ADMIN. Why the extra capability: in a cluster the pod's hostNetwork
#                already puts the agent in the node's network namespace, but a lab's node is a
#                named namespace the agent must setns() into (`--lab`), and setns() into a network
#                namespace needs CAP_SYS_ADMIN. With exactly the DaemonSet's set the agent stops at
#                that setns() with EPERM (checked by hand on Linux 6.18). Running the container
#                inside the lab's node namespace instead (podman --network ns:...) would test the
#                exact set, but these checks only ever use --network host.
#
# Took 17 s here with an up-to-date image, 60-64 s when the image had to be rebuilt (44-47 s of it).
# Not part of the test suite (scripts/test.sh). Needs root, podman, and the .venv of
# scripts/setup.sh. Everything it creates (containers, the lab, temporary files) is removed on
# every exit path; it never creates a container network and changes nothing in the root network
# namespace.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"
py="$here/.venv/bin/python"
cli="$here/.venv/bin/bpftrace-hostport"
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n 1)
IMAGE=${IMAGE:-localhost/bpftrace-hostport:$version}

build=auto
runs=(privileged caps)
for arg in "$@"; do
  case "$arg" in
    --no-build) build=never ;;
    --privileged-only) runs=(privileged) ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "check-image: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done

t0=$(date +%s)
elapsed() { echo "$(( $(date +%s) - t0 ))s"; }
say() { echo "check-image: $*"; }
ok() { printf 'check-image: ok    %s\n' "$*"; }
fail() {
  printf 'check-image: FAIL  %s\n' "$*"
  if [ -n "${ctr:-}" ] && podman container exists "$ctr" 2>/dev/null; then
    echo "check-image: last lines of the agent's log:"
    timeout 20 podman logs --tail 25 "$ctr" 2>&1 | sed 's/^/    /' || true
  fi
  say "FAILED after $(elapsed)"
  exit 1
}

[ "$(id -u)" = 0 ] || { echo "check-image: run as root (podman, the lab)." >&2; exit 2; }
[ -x "$cli" ] || { echo "check-image: no $cli: run scripts/setup.sh first." >&2; exit 2; }
for tool in podman curl timeout; do
  command -v "$tool" >/dev/null || { echo "check-image: $tool is missing." >&2; exit 2; }
done

work=$(mktemp -d /tmp/check-image.XXXXXX)
lab="img$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')"
containers=()
lab_up=
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  for c in "${containers[@]}"; do
    timeout 60 podman rm -f -t 10 "$c" >/dev/null 2>&1 || true
  done
  if [ -n "$lab_up" ]; then
    timeout 120 "$cli" lab down --name "$lab" >/dev/null 2>&1 || say "warning: \`lab down --name $lab\` failed"
  fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- image ----------------------------------------------------------------------------------
# Stale = the files the wheel would install (pyproject's packages and package data) differ from
# the image's site-packages/bpftrace_hostport: then the checks would test old code.
tree_fingerprint() {
  "$py" - "$here" <<'EOF'
import glob, hashlib, os, sys, tomllib
root = sys.argv[1]
cfg = tomllib.load(open(os.path.join(root, "pyproject.toml"), "rb"))["tool"]["setuptools"]
dirs, data = cfg.get("package-dir", {}), cfg.get("package-data", {})
out = []
for pkg in cfg["packages"]:
    src = os.path.join(root, dirs.get(pkg, pkg.replace(".", "/")))
    dst = pkg.replace(".", "/")
    for pat in ["*.py"] + data.get(pkg, []):
        for f in glob.glob(os.path.join(src, pat)):
            if os.path.isfile(f):
                out.append(f"{hashlib.sha256(open(f, 'rb').read()).hexdigest()} {dst}/{os.path.relpath(f, src)}")
print("\n".join(sorted(set(out))))
EOF
}
image_fingerprint() {
  timeout 120 podman run --rm -i --network host --entrypoint python3 "$IMAGE" - <<'EOF'
import hashlib, os, sysconfig
base = os.path.join(sysconfig.get_paths()["purelib"], "bpftrace_hostport")
out = []
for d, dirs, files in os.walk(base):
    dirs[:] = [x for x in dirs if x != "__pycache__"]
    for f in files:
        p = os.path.join(d, f)
        rel = os.path.relpath(p, os.path.dirname(base))
        out.append(f"{hashlib.sha256(open(p, 'rb').read()).hexdigest()} {rel}")
print("\n".join(sorted(out)))
EOF
}

why=
if ! podman image exists "$IMAGE"; then
  why="missing"
elif [ "$build" = auto ] && [ "$(tree_fingerprint)" != "$(image_fingerprint)" ]; then
  why="older than this checkout"
fi
if [ -n "$why" ]; then
  [ "$build" = never ] && [ "$why" = missing ] && fail "image $IMAGE is missing (run without --no-build)"
  say "image $IMAGE is $why: building it with scripts/build-image.sh"
  b0=$(date +%s)
  old_id=$(podman image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)
  if ! IMAGE="$IMAGE" timeout 1200 bash "$here/scripts/build-image.sh" >"$work/build.log" 2>&1; then
    tail -n 30 "$work/build.log" | sed 's/^/    /'
    fail "scripts/build-image.sh failed"
  fi
  ok "image built: $IMAGE in $(( $(date +%s) - b0 ))s"
  # The image it replaced, now untagged: remove it (only that one; fails harmlessly when in use).
  if [ -n "$old_id" ] && [ "$old_id" != "$(podman image inspect -f '{{.Id}}' "$IMAGE")" ] \
     && [ -z "$(podman image inspect -f '{{join .RepoTags ","}}' "$old_id" 2>/dev/null)" ]; then
    timeout 120 podman rmi "$old_id" >/dev/null 2>&1 || true
  fi
else
  ok "image $IMAGE present$([ "$build" = auto ] && echo " and matches this checkout")"
fi

# --- the DaemonSet's container settings, read from deploy/daemonset.yaml ---------------------
mkdir -p "$work/rec"
"$py" - "$here/deploy/daemonset.yaml" "$work" <<'EOF'
import os, re, sys, yaml
path, work = sys.argv[1:]
ds = next(d for d in yaml.safe_load_all(open(path)) if d and d.get("kind") == "DaemonSet")
spec = ds["spec"]["template"]["spec"]
c = next(c for c in spec["containers"] if c["name"] == "agent")
# The DaemonSet records nothing by default (its --record-dir and the volume are an opt-in,
# commented out there); this check records at the documented path, to read it back with `report`.
record_dir = "/var/lib/bpftrace-hostport"
vols = {v["name"]: v for v in spec["volumes"]}

def size(q):   # Kubernetes quantity (Mi, Gi) -> podman's k/m/g
    n, unit = re.fullmatch(r"(\d+)([KMG]i)?", str(q)).groups()
    return n + {"Ki": "k", "Mi": "m", "Gi": "g", None: ""}[unit]

common, sec = ["-v", f"{work}/rec:{record_dir}"], []
for m in c["volumeMounts"]:
    v = vols[m["name"]]
    ro = ":ro" if m.get("readOnly") else ""
    if "hostPath" in v:
        common += ["-v", f"{v['hostPath']['path']}:{m['mountPath']}{ro}"]
    elif "emptyDir" in v:
        limit = v["emptyDir"].get("sizeLimit")
        common += ["--tmpfs", m["mountPath"] + (f":size={size(limit)}" if limit else "")]
    else:
        sys.exit(f"daemonset.yaml: volume {m['name']} is neither hostPath nor emptyDir")
sc = c.get("securityContext", {})
if sc.get("readOnlyRootFilesystem"):
    common += ["--read-only", "--read-only-tmpfs=false"]
if "runAsUser" in sc:
    common += ["--user", str(sc["runAsUser"])]
mem = c.get("resources", {}).get("limits", {}).get("memory")
if mem:
    common += ["--memory", size(mem)]
caps = sc.get("capabilities", {})
for d in caps.get("drop", []):
    sec += ["--cap-drop", d]
sec += ["--cap-add", ",".join(caps.get("add", []) + ["SYS_ADMIN"])]   # SYS_ADMIN: --lab's setns()
if sc.get("allowPrivilegeEscalation") is False:
    sec += ["--security-opt", "no-new-privileges"]
if sc.get("seccompProfile", {}).get("type") == "Unconfined":
    sec += ["--security-opt", "seccomp=unconfined"]
if sc.get("privileged"):
    sys.exit("daemonset.yaml asks for privileged: the caps run would test nothing new")
open(os.path.join(work, "common.args"), "w").write("\n".join(common) + "\n")
open(os.path.join(work, "caps.args"), "w").write("\n".join(sec) + "\n")
open(os.path.join(work, "caps.txt"), "w").write(",".join(caps.get("add", [])))
EOF
mapfile -t common_args <"$work/common.args"
mapfile -t caps_args <"$work/caps.args"
say "from deploy/daemonset.yaml: ${common_args[*]}"
record_in_ctr=$(sed -n 's/^.*\/rec:\([^:]*\).*$/\1/p' "$work/common.args")

# --- the lab --------------------------------------------------------------------------------
state_root=$("$py" -c 'from bpftrace_hostport.lab.build import STATE_ROOT; print(STATE_ROOT)')
lab_up=1
if ! timeout 180 "$cli" lab up --name "$lab" --scenario hostnetwork >"$work/lab.log" 2>&1; then
  sed 's/^/    /' "$work/lab.log"
  fail "lab up --name $lab --scenario hostnetwork"
fi
[ -s "$state_root/$lab/state.json" ] || fail "the lab's state is not in $state_root/$lab"
ok "lab $lab up (hostnetwork scenario), state in $state_root/$lab"

free_port() {
  "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
# Sum of the values of one metric's series whose label text contains $2 (0 when absent).
metric() {
  awk -v name="$1" -v want="$2" 'index($0, name "{") == 1 && (want == "" || index($0, want)) { s += $NF; n++ }
                                 END { if (n) printf "%d\n", s; else print "absent" }' "$work/metrics"
}
scrape() { curl -s -m 5 -o "$work/metrics" "http://127.0.0.1:$port/metrics" || : >"$work/metrics"; }
healthz() { curl -s -m 5 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/healthz" || true; }
running() { [ "$(podman inspect -f '{{.State.Running}}' "$ctr" 2>/dev/null)" = true ]; }
# wait_for SECONDS DESCRIPTION COMMAND...: polls COMMAND every 0.5 s until it succeeds.
wait_for() {
  local limit=$1 what=$2 end=$(( $(date +%s) + $1 )); shift 2
  until "$@"; do
    running || fail "$what: the agent exited (code $(podman inspect -f '{{.State.ExitCode}}' "$ctr"))"
    [ "$(date +%s)" -lt "$end" ] || return 1
    sleep 0.5
  done
}

run_agent() {
  local mode=$1 r0 s0 rc f n code
  r0=$(date +%s)
  ctr="check-image-$lab-$mode"
  port=$(free_port)
  rm -rf "$work/rec" && mkdir -p "$work/rec"
  local sec=(--privileged)
  [ "$mode" = caps ] && sec=("${caps_args[@]}")
  say "[$mode] agent: ${sec[*]}"
  containers+=("$ctr")
  timeout 120 podman run -d --name "$ctr" --network host "${sec[@]}" "${common_args[@]}" \
      -v /var/run/netns:/var/run/netns:ro -v "$state_root/$lab:$state_root/$lab:ro" \
      -e BPFTRACE_HOSTPORT_LAB_DIR="$state_root" \
      "$IMAGE" --lab "$lab" --metrics "127.0.0.1:$port" --record-dir "$record_in_ctr" \
      --check-interval 2 >/dev/null || fail "[$mode] podman run"

  s0=$(date +%s)
  # The DaemonSet's startupProbe allows 330 s for the compile; the tool gives up after 300 s.
  wait_for 330 "[$mode] /healthz" eval '[ "$(healthz)" = 200 ]' || fail "[$mode] /healthz not 200 within 330 s"
  ok "[$mode] agent attached: /healthz 200 after $(( $(date +%s) - s0 ))s"

  timeout 120 "$cli" lab traffic --name "$lab" --count 20 >"$work/traffic.log" 2>&1 \
    || { sed 's/^/    /' "$work/traffic.log"; fail "[$mode] lab traffic --count 20"; }
  timeout 120 "$cli" lab traffic --name "$lab" --to 9000 --count 3 >>"$work/traffic.log" 2>&1 \
    || { sed 's/^/    /' "$work/traffic.log"; fail "[$mode] lab traffic --to 9000 --count 3"; }

  flows() { scrape; n=$(metric bpftrace_hostport_flows_total 'host_port="8000"'); [ "$n" != absent ] && [ "$n" -ge 20 ]; }
  wait_for 30 "[$mode] flows" flows || true
  sleep 2; scrape    # nothing more may arrive: exactly 20
  n=$(metric bpftrace_hostport_flows_total 'host_port="8000"')
  [ "$n" = 20 ] || fail "[$mode] bpftrace_hostport_flows_total{host_port=\"8000\"} is $n, want 20"
  ok "[$mode] flows_total{host_port=\"8000\"} = 20 ($(metric bpftrace_hostport_answered_flows_total 'host_port="8000"') answered)"

  misses() { scrape; n=$(metric bpftrace_hostport_misses_total 'host_port="9000"'); [ "$n" != absent ] && [ "$n" -ge 3 ]; }
  wait_for 30 "[$mode] misses" misses \
    || fail "[$mode] bpftrace_hostport_misses_total{host_port=\"9000\"} is $n, want >= 3"
  ok "[$mode] misses_total{host_port=\"9000\"} = $n (>= 3)"

  findings() { scrape; grep -q '^bpftrace_hostport_check_findings{code="hostnetwork-hostport"' "$work/metrics"; }
  wait_for 30 "[$mode] check findings" findings \
    || fail "[$mode] no bpftrace_hostport_check_findings{code=\"hostnetwork-hostport\"} within 30 s"
  ok "[$mode] check_findings: $(grep '^bpftrace_hostport_check_findings{' "$work/metrics" \
        | sed 's/^bpftrace_hostport_check_findings//; s/,node="[^"]*"//' | tr '\n' ' ')"

  code=$(healthz)
  [ "$code" = 200 ] || fail "[$mode] /healthz answered $code after the traffic, want 200"
  [ "$(metric bpftrace_hostport_up '')" = 1 ] || fail "[$mode] bpftrace_hostport_up is not 1"
  ok "[$mode] /healthz 200, bpftrace_hostport_up 1"
  # Information only: the container's peak memory (cgroup v2 memory.peak or v1 max_usage).
  local id d peak=
  id=$(podman inspect -f '{{.Id}}' "$ctr")
  for d in $(find /sys/fs/cgroup -maxdepth 6 -type d -name "*$id*" 2>/dev/null); do
    [ -r "$d/memory.peak" ] && peak=$(cat "$d/memory.peak") && break
    [ -r "$d/memory.max_usage_in_bytes" ] && peak=$(cat "$d/memory.max_usage_in_bytes") && break
  done
  [ -z "$peak" ] || say "[$mode] (peak memory of the container, page cache included: $(( peak / 1048576 )) MiB)"

  s0=$(date +%s)
  timeout 90 podman stop -t 30 "$ctr" >/dev/null || fail "[$mode] podman stop -t 30 did not return"
  rc=$(podman inspect -f '{{.State.ExitCode}}' "$ctr")
  [ "$rc" = 0 ] || fail "[$mode] agent exited $rc on SIGTERM, want 0"
  ok "[$mode] SIGTERM: exit 0 after $(( $(date +%s) - s0 ))s ($(timeout 20 podman logs "$ctr" 2>&1 | grep '^stopped:' | tail -n 1))"

  f=$(ls "$work"/rec/*.arrow 2>/dev/null | head -n 1 || true)
  [ -n "$f" ] && [ -s "$f" ] || fail "[$mode] no recording in the record dir ($(ls "$work/rec" | tr '\n' ' '))"
  timeout 120 "$cli" report "$f" >"$work/report.txt" 2>&1 \
    || { sed 's/^/    /' "$work/report.txt"; fail "[$mode] bpftrace-hostport report $(basename "$f")"; }
  timeout 120 "$cli" report --format json "$f" >"$work/report.json" 2>/dev/null || fail "[$mode] report --format json"
  n=$("$py" - "$work/report.json" <<'EOF'
import json, sys
def walk(o):
    if isinstance(o, dict):
        if o.get("host_port") == 8000 and isinstance(o.get("flows"), int):
            yield o["flows"]
        for v in o.values():
            yield from walk(v)
    elif isinstance(o, list):
        for v in o:
            yield from walk(v)
print(max(walk(json.load(open(sys.argv[1]))), default="none"))
EOF
)
  [ "$n" = 20 ] || fail "[$mode] the report of $(basename "$f") shows $n flows for hostPort 8000, want 20"
  ok "[$mode] recording $(basename "$f") ($(stat -c %s "$f") bytes) read by \`report\`: $(grep -m1 ' flows, ' "$work/report.txt")"

  timeout 60 podman rm "$ctr" >/dev/null || fail "[$mode] podman rm"
  ok "[$mode] container removed; run took $(( $(date +%s) - r0 ))s"
}

for mode in "${runs[@]}"; do
  run_agent "$mode"
done
[ " ${runs[*]} " = " privileged caps " ] && say "the DaemonSet's capabilities ($(cat "$work/caps.txt")) + SYS_ADMIN for --lab: works"

timeout 120 "$cli" lab down --name "$lab" >/dev/null 2>&1 || fail "lab down --name $lab"
lab_up=
ok "lab $lab removed"
say "PASS: all checks in $(elapsed)"
