"""`lab up --runtime containerd`: the lab's pods made by a real containerd, through CRI.

The lab plays the kubelet: a containerd of its own runs in the lab's node namespace, and every pod
is a RunPodSandbox (with the manifest's port mappings) + CreateContainer + StartContainer, so
containerd's CRI plugin runs the CNI plugins itself, with its own conventions: a named network
namespace /var/run/netns/cni-<uuid> per pod, the sandbox id as CNI_CONTAINERID (hence in portmap's
rule comments), its own CNI config directory. hostNetwork pods are sandboxes in the node's
namespace (NamespaceMode NODE), with no CNI call, as the kubelet asks for them.

Everything of this containerd is the lab's own (shared/ENVIRONMENT.md has the measurements behind
each choice):

* root, state, the gRPC and ttrpc sockets, the CNI config directory, runc's root and the opt
  directory live under <lab dir>/ctd/; the images are imported from archives lab/images.py builds;
  the sandbox (pause) image is that local one, so nothing is pulled;
* it is started with `nsenter --net=/var/run/netns/<node>`: `ip netns exec` would remount /sys,
  which hides the cgroup mounts from runc ("no cgroup mount found in mountinfo");
* `restrict_oom_score_adj = true` (without CAP_SYS_RESOURCE runc cannot lower
  /proc/self/oom_score_adj) and no AppArmor profile;
* the pods' cgroups go under a parent of the lab's own (`/bhp-<lab>-<run id>`).
What containerd 1.6 puts outside its directories: each shim's socket under /run/containerd/s/
(a name hashed from our socket and the sandbox id; the shim removes it when it exits) and
libcni's result cache under /var/lib/cni/results (removed by CNI DEL).

The containers run the project's own server (lab/servers.py) with the node's Python, /usr and the
server file bind-mounted read-only into a busybox root: the same server as the direct runtime, so
both answer byte for byte alike (HTTP with the pod's name, UDP echo), dual-stack, and stop on
SIGTERM. busybox alone has an HTTP server but no UDP echo (udpsvd forks a program per peer and
keeps that peer's later datagrams for it, which would change what a streaming UDP client sees).

`remove` takes a lab's containerd down from its files alone (runtime.json), so `lab down` cleans
up after a crash or a kill -9 of `lab up`: it restarts the lab's containerd when it is not running
(containerd then finds its sandboxes and shims again), stops and removes every sandbox through CRI
(containerd runs CNI DEL and removes the cni-* namespace), stops containerd, and only then
removes what might still be there: processes that name the lab's directory, mounts under it, the
cni-* namespaces it recorded, the cgroup parent.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from bpftrace_hostport.errors import UserError
from bpftrace_hostport.lab import images as imagesmod
from bpftrace_hostport.lab import servers as serversmod
from bpftrace_hostport.pods import cri

NETNS_DIR = "/var/run/netns"
TOOLS = {"containerd": "containerd", "runc": "runc", "ctr": "containerd"}   # binary -> Debian package
START_TIMEOUT = 30.0
READY_TIMEOUT = 30.0
SERVER_PATH = "/opt/bhp/servers.py"
POD_UID_LABEL = "io.kubernetes.pod.uid"
# Directories containerd 1.6 and libcni create outside the lab's own (shim sockets, CNI result
# cache): removed at down when the lab created them and they are empty again.
SHARED_DIRS = ("/run/containerd/s", "/run/containerd", "/var/lib/cni/results", "/var/lib/cni")


class ContainerdError(UserError):
    pass


def check_prerequisites() -> None:
    missing = sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})
    if missing:
        raise ContainerdError(f"`lab up --runtime containerd` needs {' and '.join(missing)}: apt-get install "
                            f"{' '.join(missing)} (scripts/test.sh does).")
    try:
        cri._modules()
    except cri.CRIMissing:
        raise ContainerdError("The CRI client is missing: pip install container-runtime-interface-api grpcio "
                            "(scripts/setup.sh installs the package with it).") from None


# -- the files of one lab's containerd ---------------------------------------------------------
def ctd_dir(lab_dir: Path) -> Path:
    return Path(lab_dir) / "ctd"


def _paths(lab_dir: Path) -> Dict[str, Path]:
    d = ctd_dir(lab_dir)
    return {"dir": d, "root": d / "root", "state": d / "state", "sock": d / "ctd.sock",
            "ttrpc": d / "ctd.sock.ttrpc", "config": d / "config.toml", "cni": d / "net.d",
            "runc": d / "runc", "opt": d / "opt", "pods": d / "pods", "log": d / "containerd.log",
            "meta": d / "runtime.json"}


def _read_meta(lab_dir: Path) -> dict:
    with contextlib.suppress(OSError, ValueError):
        return json.loads(_paths(lab_dir)["meta"].read_text())
    return {}


def _write_meta(lab_dir: Path, meta: dict) -> None:
    p = _paths(lab_dir)["meta"]
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, p)


def endpoint(lab_dir: Path) -> str:
    return "unix://" + str(_paths(lab_dir)["sock"])


def _config(p: Dict[str, Path], sandbox_image: str, cni_bin_dir: str) -> str:
    cri_ = '[plugins."io.containerd.grpc.v1.cri"'
    return f"""# The lab's own containerd (bpftrace_hostport/lab/containerd.py): nothing shared with the machine's.
version = 2
root = "{p['root']}"
state = "{p['state']}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{p['sock']}"

[ttrpc]
  address = "{p['ttrpc']}"

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{p['opt']}"

{cri_}]
  sandbox_image = "{sandbox_image}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  max_container_log_line_size = 16384

{cri_}.cni]
  bin_dir = "{cni_bin_dir}"
  conf_dir = "{p['cni']}"
  max_conf_num = 1

{cri_}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

{cri_}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

{cri_}.containerd.runtimes.runc.options]
  Root = "{p['runc']}"
  SystemdCgroup = false

{cri_}.registry]
  config_path = ""
"""


def _alive(pid: Optional[int]) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
                return False
    return True


def _start_daemon(lab_dir: Path, node_netns: str) -> int:
    p = _paths(lab_dir)
    log = open(p["log"], "ab")
    try:
        # nsenter --net, not `ip netns exec` (module docstring); its own session, so a Ctrl-C of
        # `lab up` does not reach it and `lab down` stops it.
        proc = subprocess.Popen(["nsenter", f"--net={os.path.join(NETNS_DIR, node_netns)}", "--",
                                 shutil.which("containerd") or "containerd", "--config", str(p["config"])],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    finally:
        log.close()
    meta = _read_meta(lab_dir)
    meta["pid"] = proc.pid
    _write_meta(lab_dir, meta)
    deadline = time.monotonic() + START_TIMEOUT
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ContainerdError(f"containerd exited at start ({_log_tail(p['log'])}); see {p['log']}.")
        if p["sock"].exists():
            try:
                with cri.RuntimeClient(endpoint(lab_dir), timeout=2) as c:
                    c.version()
                    status = c._call("Status", c.pb.StatusRequest())
                    if all(cond.status for cond in status.status.conditions if cond.type == "RuntimeReady"):
                        return proc.pid
            except cri.CRIError as e:
                last = str(e)
        time.sleep(0.1)
    raise ContainerdError(f"The lab's containerd did not answer on {p['sock']} within {START_TIMEOUT:g} s "
                        f"({last}); see {p['log']}.")


def _log_tail(path: Path) -> str:
    with contextlib.suppress(OSError):
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if "level=error" in ln or
                 "level=fatal" in ln]
        if lines:
            return lines[-1][-240:]
    return "no error logged"


def _created_dirs_file(labs_dir: Path) -> Path:
    """SHARED_DIRS that some containerd lab created (any lab's down removes them once empty)."""
    return labs_dir / ".containerd-created-dirs"


def _note_created_dirs(labs_dir: Path, dirs: List[str]) -> None:
    if dirs:
        with open(_created_dirs_file(labs_dir), "a") as f:
            f.write("".join(d + "\n" for d in dirs))


def _remove_created_dirs(labs_dir: Path) -> None:
    path = _created_dirs_file(labs_dir)
    with contextlib.suppress(OSError):
        noted = set(path.read_text().split())
        for d in SHARED_DIRS:                    # deepest first
            if d in noted:
                with contextlib.suppress(OSError):
                    os.rmdir(d)                  # only when empty: another lab may still use it
        left = [d for d in SHARED_DIRS if d in noted and os.path.exists(d)]
        if left:
            path.write_text("".join(d + "\n" for d in left))
        else:
            path.unlink()


def start(lab_dir: Path, node_netns: str, run_tag: str, cni_conf: dict, cni_bin_dir: str) -> None:
    """Starts the lab's containerd in the node namespace and imports the lab's images."""
    check_prerequisites()
    p = _paths(lab_dir)
    for k in ("dir", "cni", "pods", "opt"):
        p[k].mkdir(parents=True, exist_ok=True)
    imgs = imagesmod.images(p["dir"] / "images")     # the lab's own: removed with it
    _note_created_dirs(Path(lab_dir).parent, [d for d in SHARED_DIRS if not os.path.exists(d)])
    _write_meta(lab_dir, {"node_netns": node_netns, "cgroup_parent": f"/bhp-{run_tag}",
                          "images": {k: v.ref for k, v in imgs.items()}, "netns": [], "pid": None})
    (p["cni"] / "10-bhp.conflist").write_text(json.dumps(cni_conf, indent=1))
    p["config"].write_text(_config(p, imgs["pause"].ref, cni_bin_dir))
    _start_daemon(lab_dir, node_netns)
    for img in imgs.values():
        r = subprocess.run(["ctr", "--address", str(p["sock"]), "-n", "k8s.io", "images", "import",
                            str(img.archive)], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise ContainerdError(f"ctr could not import the lab image {img.ref}: "
                                f"{(r.stderr or r.stdout).strip()[-300:]}")


def client(lab_dir: Path) -> cri.RuntimeClient:
    return cri.RuntimeClient(endpoint(lab_dir), timeout=30)


# -- pods -------------------------------------------------------------------------------------
def _k8s_ports(ports: List[dict]) -> List[dict]:
    """The container's ports as the kubelet writes them into io.kubernetes.container.ports."""
    out = []
    for p in ports:
        d = {"containerPort": p["container_port"], "protocol": p["protocol"]}
        if p.get("name"):
            d["name"] = p["name"]
        if p.get("host_port"):
            d["hostPort"] = p["host_port"]
        if p.get("host_ip"):
            d["hostIP"] = p["host_ip"]
        out.append(d)
    return out


def _sandbox_config(lab_dir: Path, pod, uid: str, attempt: int) -> dict:
    meta = _read_meta(lab_dir)
    mode = "NODE" if pod.host_network else "POD"
    cfg = {
        "metadata": {"name": pod.name, "namespace": pod.namespace, "uid": uid, "attempt": attempt},
        "hostname": pod.name[:63] if not pod.host_network else "",
        "logDirectory": str(_paths(lab_dir)["pods"] / f"{pod.namespace}_{pod.name}_{uid}"),
        "portMappings": [
            {"protocol": p["protocol"], "containerPort": p["container_port"], "hostPort": p["host_port"],
             **({"hostIp": p["host_ip"]} if p.get("host_ip") else {})}
            for p in pod.ports if p.get("host_port")],
        "labels": {**{k: str(v) for k, v in (pod.labels or {}).items()},
                   "io.kubernetes.pod.name": pod.name, "io.kubernetes.pod.namespace": pod.namespace,
                   POD_UID_LABEL: uid},
        "annotations": {"kubernetes.io/config.source": "bpftrace-hostport-lab"},
        "linux": {"cgroupParent": meta.get("cgroup_parent", ""),
                  "securityContext": {"namespaceOptions": {"network": mode, "pid": "CONTAINER",
                                                           "ipc": "POD"}}},
    }
    return cfg


def _server_command(pod, ports: List[dict]) -> List[str]:
    args = ["/usr/bin/python3", "-I", "-S", SERVER_PATH, "--pod", f"{pod.namespace}/{pod.name}"]
    seen = set()
    for p in ports:
        key = (p["protocol"], p["container_port"])
        if key in seen or p["protocol"] not in ("TCP", "UDP"):
            continue   # SCTP gets its mapping, but the lab serves TCP and UDP only
        seen.add(key)
        args += ["--tcp" if p["protocol"] == "TCP" else "--udp", str(p["container_port"])]
    # The server writes "ready" to its fd once it listens: stdout here, which containerd logs.
    return args + ["--ready-fd", "1"]


def _mounts() -> List[dict]:
    mounts = [{"containerPath": "/usr", "hostPath": "/usr", "readonly": True},
              {"containerPath": SERVER_PATH, "hostPath": os.path.realpath(serversmod.__file__), "readonly": True}]
    base = os.path.realpath(sys.base_prefix)
    if not (base == "/usr" or base.startswith("/usr/")):
        mounts.append({"containerPath": base, "hostPath": base, "readonly": True})
    return mounts


def _wait_ready(log: Path, c: cri.RuntimeClient, cid: str, what: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            text = log.read_text(errors="replace")
            if " stdout F ready" in text or " stdout P ready" in text:
                return
        state = c.container_status(cid)["status"].get("state")
        if state == "CONTAINER_EXITED":
            break
        time.sleep(0.05)
    tail = "no output"
    with contextlib.suppress(OSError):
        lines = [ln.split(" ", 3)[-1] for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        tail = lines[-1] if lines else tail
    raise ContainerdError(f"The server container of {what} did not start: {tail[:300]}")


def _netns_path(info: dict) -> str:
    """The sandbox's network namespace: the OCI spec's (containerd 1.6), or netNamespacePath (1.7+)."""
    for ns in ((info.get("runtimeSpec") or {}).get("linux") or {}).get("namespaces") or []:
        if isinstance(ns, dict) and ns.get("type") == "network" and ns.get("path"):
            return str(ns["path"])
    return str(info.get("netNamespacePath") or "")


def run_pod(lab_dir: Path, pod, uid: str, containers: List[str], on_sandbox=None) -> None:
    """Runs one pod through CRI; fills pod.container_id (the sandbox id), pod.netns, pod.ips (pod
    network), pod.containers and pod.server_pid. `on_sandbox(pod)` is called as soon as the sandbox
    exists (the caller records it)."""
    what = f"pod {pod.namespace}/{pod.name}"
    sandbox_cfg = _sandbox_config(lab_dir, pod, uid, 0)
    images = _read_meta(lab_dir).get("images", {})
    with client(lab_dir) as c:
        try:
            sid = c.run_sandbox(sandbox_cfg, timeout=120)
        except cri.CRIError as e:
            raise ContainerdError(f"containerd could not run the sandbox of {what}: {e.details[:300]}") from None
        pod.container_id = sid
        st = c.sandbox_status(sid)
        info = st.get("info") or {}
        netns_path = _netns_path(info)
        if not pod.host_network:
            net = st["status"].get("network") or {}
            pod.ips = [ip for ip in [net.get("ip")] + [a.get("ip") for a in net.get("additionalIps", [])] if ip]
            pod.netns = os.path.basename(netns_path) if netns_path.startswith(NETNS_DIR + "/") else None
            meta = _read_meta(lab_dir)
            if pod.netns and pod.netns not in meta.setdefault("netns", []):
                meta["netns"].append(pod.netns)
                _write_meta(lab_dir, meta)
        if on_sandbox:
            on_sandbox(pod)
        # One container per container of the manifest, each serving its own ports (a container
        # without ports runs the server with none: it only waits, as a sidecar would).
        order = list(dict.fromkeys([p["container"] for p in pod.ports] + list(containers))) or ["main"]
        pod.containers = []
        for name in order:
            ports = [p for p in pod.ports if p["container"] == name]
            cfg = {
                "metadata": {"name": name, "attempt": 0},
                "image": {"image": images.get("server", "")},
                "command": _server_command(pod, ports),
                "workingDir": "/",
                "mounts": _mounts(),
                "logPath": f"{name}.log",
                "labels": {"io.kubernetes.container.name": name, "io.kubernetes.pod.name": pod.name,
                           "io.kubernetes.pod.namespace": pod.namespace, POD_UID_LABEL: uid},
                "annotations": {"io.kubernetes.container.ports": json.dumps(_k8s_ports(ports))} if ports else {},
                "linux": {"securityContext": {"namespaceOptions": sandbox_cfg["linux"]["securityContext"]
                                              ["namespaceOptions"]}},
            }
            try:
                cid = c.create_container(sid, cfg, sandbox_cfg)
                pod.containers.append({"name": name, "id": cid})
                c.start_container(cid)
            except cri.CRIError as e:
                raise ContainerdError(f"containerd could not start container {name} of {what}: "
                                    f"{e.details[:300]}") from None
            _wait_ready(Path(sandbox_cfg["logDirectory"]) / f"{name}.log", c, cid, what)
            if pod.server_pid is None and ports:
                pid = (c.container_status(cid, verbose=True).get("info") or {}).get("pid")
                pod.server_pid = int(pid) if pid else None


def stop_servers(lab_dir: Path, pod) -> None:
    """StopContainer for each of the pod's containers: the sandbox, its namespace and its hostPort
    rules stay, nothing listens any more (TCP is reset, UDP gets port unreachable)."""
    with client(lab_dir) as c:
        for cont in pod.containers:
            try:
                c.stop_container(cont["id"], grace=0)
            except cri.CRIError as e:
                if e.code != "NOT_FOUND":
                    raise ContainerdError(f"containerd could not stop container {cont['name']} of pod "
                                          f"{pod.namespace}/{pod.name}: {e.details[:300]}") from None
    pod.server_pid = None


def remove_pod(lab_dir: Path, pod) -> None:
    """StopPodSandbox (containerd stops the containers and runs CNI DEL) and RemovePodSandbox."""
    if not pod.container_id:
        return
    with client(lab_dir) as c:
        for call in (c.stop_sandbox, c.remove_sandbox):
            try:
                call(pod.container_id)
            except cri.CRIError as e:
                if e.code != "NOT_FOUND":
                    raise ContainerdError(f"containerd could not remove the sandbox of pod "
                                        f"{pod.namespace}/{pod.name}: {e.details[:300]}") from None


# -- taking it all down ---------------------------------------------------------------------------
def _procs_naming(text: str) -> List[int]:
    out = []
    for d in glob.glob("/proc/[0-9]*"):
        with contextlib.suppress(OSError):
            with open(os.path.join(d, "cmdline"), "rb") as f:
                if text.encode() in f.read():
                    out.append(int(os.path.basename(d)))
    return [p for p in out if p != os.getpid()]


def _children(pids: List[int]) -> List[int]:
    """Every descendant of pids (the shims' containers)."""
    parent: Dict[int, int] = {}
    for d in glob.glob("/proc/[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(d) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            parent[int(d.split("/")[2])] = int(fields[1])
    out, todo = [], list(pids)
    while todo:
        p = todo.pop()
        for child, ppid in parent.items():
            if ppid == p and child not in out:
                out.append(child)
                todo.append(child)
    return out


def _stop(pid: int, grace: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.05)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        for _ in range(40):
            if not _alive(pid):
                break
            time.sleep(0.05)


def _mounts_under(path: Path) -> List[str]:
    out = []
    prefix = str(path).rstrip("/") + "/"
    with contextlib.suppress(OSError):
        with open("/proc/self/mountinfo") as f:
            for line in f:
                mp = line.split()[4].replace("\\040", " ")
                if mp.startswith(prefix) or mp == str(path):
                    out.append(mp)
    return sorted(out, key=len, reverse=True)


def remove(lab_dir: Path) -> List[str]:
    """Takes the lab's containerd down with everything it made; idempotent. Returns the pod
    namespaces removed."""
    p = _paths(lab_dir)
    if not p["dir"].exists():
        return []
    meta = _read_meta(lab_dir)
    node_netns = meta.get("node_netns")
    removed: List[str] = []
    pid = meta.get("pid")
    if p["config"].exists() and node_netns and os.path.exists(os.path.join(NETNS_DIR, node_netns)):
        try:
            if not _alive(pid):
                pid = _start_daemon(lab_dir, node_netns)        # it finds its sandboxes again
            with client(lab_dir) as c:
                for sb in c.list_sandboxes():
                    for call in (c.stop_sandbox, c.remove_sandbox):
                        with contextlib.suppress(cri.CRIError):
                            call(sb["id"], timeout=60)
        except (UserError, cri.CRIError, cri.CRIMissing):
            pass                                                  # the sweep below does it by hand
    if pid:
        _stop(pid, 10.0)
    # What a containerd that could not be asked leaves: shims (and their containers), mounts,
    # namespaces. Shims name our socket in their command line.
    shims = _procs_naming(str(p["dir"]))
    for q in _children(shims) + shims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(q, signal.SIGKILL)
    for q in shims:
        for _ in range(40):
            if not _alive(q):
                break
            time.sleep(0.05)
    for ns in meta.get("netns", []):
        path = os.path.join(NETNS_DIR, ns)
        if os.path.exists(path):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
            removed.append(ns)
    for mp in _mounts_under(p["dir"]):
        subprocess.run(["umount", "-l", mp], capture_output=True, timeout=30)
    parent = meta.get("cgroup_parent")
    if parent and parent.startswith("/bhp-"):
        for d in sorted(glob.glob(f"/sys/fs/cgroup/*{parent}") + glob.glob(f"/sys/fs/cgroup{parent}"),
                        reverse=True):
            for sub in sorted(glob.glob(os.path.join(d, "**/"), recursive=True), key=len, reverse=True):
                with contextlib.suppress(OSError):
                    os.rmdir(sub)
    shutil.rmtree(p["dir"], ignore_errors=True)
    _remove_created_dirs(Path(lab_dir).parent)
    return removed


def sandboxes(lab_dir: Path) -> List[dict]:
    """The sandboxes the lab's containerd knows (for `lab status` and the tests)."""
    with client(lab_dir) as c:
        return c.list_sandboxes()
