"""The lab: a Kubernetes-like node built in network namespaces with the real CNI plugins.

    client netns (eth0 10.B.0.10) --- lan0 bridge [node netns 10.B.0.1] cni0 bridge --- pod netns
                                                   nat rules by portmap              eth0 10.B.1.x

Every pod replica of the manifests gets its own network namespace and a `CNI ADD` through
Debian's plugins (bridge + host-local + portmap, chained as a container runtime chains them,
with portMappings from each container port that has a hostPort), then a real server on every
containerPort (lab/servers.py). hostNetwork pods get no CNI call and listen in the node's
namespace, as the kubelet does it. The pod list is written as `kubectl get pods -o json` would.

Names are unique per run (`bhp-<lab>-<run id>-...`), everything created is recorded in a state
file under /run/bpftrace-hostport/labs/<lab>/ as soon as it exists, and `down` removes what
the state file names, plus any namespace whose name carries the lab's prefix (after a crash or
kill -9 of an earlier run). Nothing here touches the root network namespace: every sysctl,
rule and address is set inside a namespace the lab created.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

from bpftrace_hostport import netns as netns_mod
from bpftrace_hostport.addr import endpoint_proto
from bpftrace_hostport.errors import UserError
from bpftrace_hostport.lab import PORTMAP_BACKENDS, SCENARIOS, scenarios
from bpftrace_hostport.model import ContainerPort
from bpftrace_hostport.pods.manifests import PodPlan, load_manifests, parse_manifests, scheduling_notes
from bpftrace_hostport.pods.podlist import plan_to_pod, write_pod_list

STATE_ROOT = Path(os.environ.get("BPFTRACE_HOSTPORT_LAB_DIR", "/run/bpftrace-hostport/labs"))
CNI_PATH = os.environ.get("CNI_PATH", "/usr/lib/cni")
CNI_PLUGINS = ("bridge", "host-local", "portmap")
NETNS_DIR = "/var/run/netns"
DEFAULT_MANIFEST = Path(__file__).parent / "data" / "nginx-hostport.yaml"
LAB_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,11}$")
#: Who makes the lab's pods: `direct` runs the CNI plugins by hand and the servers as processes in
#: the pod namespaces; `containerd` asks a containerd of the lab's own through CRI (lab/containerd.py).
RUNTIMES = ("direct", "containerd")
STALE_UDP_SOURCE_PORT = 40053


def _run(cmd: Sequence[str], *, input: Optional[str] = None, env=None, check=True,
         timeout: float = 30) -> subprocess.CompletedProcess:
    p = subprocess.run(list(cmd), input=input, env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise LabError(f"`{' '.join(cmd)}` failed: {(p.stderr or p.stdout).strip()[:300]}")
    return p


class LabError(UserError):
    pass


def _nsexec(ns: str, *cmd: str) -> List[str]:
    """argv running cmd in one of the lab's own namespaces (netns.py says how)."""
    return netns_mod.command_prefix(ns) + list(cmd)


@dataclass
class LabPod:
    namespace: str
    name: str
    netns: Optional[str]            # None for hostNetwork pods (they use the node's)
    container_id: Optional[str]
    ips: List[str]
    host_network: bool
    ports: List[dict]               # ContainerPort as dicts
    server_pid: Optional[int] = None
    cni_result: Optional[dict] = None
    workload: str = ""
    labels: dict = field(default_factory=dict)
    alive: bool = True              # False once deleted (kept for the stale-udp story)
    containers: List[dict] = field(default_factory=list)   # containerd: [{name, id}] of its containers


@dataclass
class LabState:
    name: str
    run_id: str
    subnet: int
    scenario: str
    ipv6: bool
    node_netns: str
    node_name: str
    node_ip: str
    node_ip6: Optional[str]
    pod_cidr: str
    pod_cidr6: Optional[str]
    clients: List[dict] = field(default_factory=list)   # {netns, ip, ip6}
    pods: List[LabPod] = field(default_factory=list)
    namespaces: List[str] = field(default_factory=list)  # every netns created, in order
    pids: List[int] = field(default_factory=list)         # background processes (client streams)
    created: float = field(default_factory=time.time)
    complete: bool = False
    runtime: str = "direct"         # RUNTIMES: who makes the pods (lab/containerd.py for containerd)
    portmap: str = "iptables"                              # the portmap plugin's backend
    services: int = 0                                      # kube-proxy Services (scenario kube-proxy)
    conntrack_entries: Optional[int] = None                # unrelated conntrack entries (kube-proxy)

    @property
    def dir(self) -> Path:
        return STATE_ROOT / self.name

    @property
    def pods_file(self) -> Path:
        return self.dir / "pods.json"

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / "state.json.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, self.dir / "state.json")

    @classmethod
    def load(cls, name: str) -> "LabState":
        path = STATE_ROOT / name / "state.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise LabError(f"No lab named {name!r} is up: start one with `bpftrace-hostport lab up --name {name}`.") from None
        except ValueError:
            raise LabError(f"The state file {path} is damaged: run `bpftrace-hostport lab down --name {name}`.") from None
        raw["pods"] = [LabPod(**p) for p in raw.get("pods", [])]
        return cls(**raw)

    def live_pods(self) -> List[LabPod]:
        return [p for p in self.pods if p.alive]

    def summary(self) -> dict:
        return {
            "name": self.name, "scenario": self.scenario, "runtime": self.runtime,
            "portmap": self.portmap, "node": self.node_name,
            "node_netns": self.node_netns, "node_ip": self.node_ip, "node_ip6": self.node_ip6,
            "pods_file": str(self.pods_file),
            "cri_endpoint": _cri_endpoint(self),
            "clients": self.clients,
            "pods": [{"namespace": p.namespace, "name": p.name, "ips": p.ips,
                      "host_network": p.host_network, "netns": p.netns or self.node_netns,
                      "alive": p.alive,
                      "mappings": [m for m in p.ports if m.get("host_port")]}
                     for p in self.pods],
        }


def _cri_endpoint(st: LabState) -> Optional[str]:
    if st.runtime != "containerd":
        return None
    from bpftrace_hostport.lab import containerd
    return containerd.endpoint(st.dir)


# -- preconditions ------------------------------------------------------------------------
def check_prerequisites() -> None:
    if os.geteuid() != 0:
        raise LabError("The lab creates network namespaces and needs root: run it with sudo.")
    for tool in ("ip", "iptables"):
        if not shutil.which(tool):
            raise LabError(f"`{tool}` is missing: install iproute2 and iptables (scripts/setup.sh does).")
    missing = [p for p in CNI_PLUGINS if not os.access(os.path.join(CNI_PATH, p), os.X_OK)]
    if missing:
        raise LabError(f"CNI plugins {', '.join(missing)} not found in {CNI_PATH}: "
                       "apt-get install containernetworking-plugins (or set CNI_PATH).")


def _check_nftables() -> None:
    """The nftables portmap: a plugins build of our own (fetched once, lab/plugins.py) and nft."""
    if os.geteuid() != 0:
        raise LabError("The lab creates network namespaces and needs root: run it with sudo.")
    if not shutil.which("nft") or not shutil.which("ip"):
        raise LabError("`nft` or `ip` is missing: install nftables and iproute2 (scripts/setup.sh does).")
    from bpftrace_hostport.lab.plugins import nftables_plugins
    nftables_plugins()


def _subnet_for(name: str) -> int:
    """A /16 second octet per lab (10.B.0.0/16), unique among the labs that are up."""
    used = set()
    if STATE_ROOT.exists():
        for d in STATE_ROOT.iterdir():
            with contextlib.suppress(Exception):
                used.add(json.loads((d / "state.json").read_text())["subnet"])
    start = 64 + int(hashlib.sha1(name.encode()).hexdigest(), 16) % 160
    for i in range(160):
        b = 64 + (start - 64 + i) % 160
        if b not in used:
            return b
    raise LabError("Too many labs are up: take some down with `bpftrace-hostport lab down --all`.")


# -- scenarios -------------------------------------------------------------------------------
# A UDP DNS pod on hostPort 5353: deleted and replaced while a client keeps sending (stale-udp,
# blackhole).
_DNS_V1 = """
apiVersion: v1
kind: Pod
metadata: {name: dns-v1, namespace: lab}
spec:
  containers:
  - name: dns
    image: coredns
    ports: [{name: dns, containerPort: 53, hostPort: 5353, protocol: UDP}]
"""

_SCENARIO_PODS = {
    "hostnetwork": """
apiVersion: v1
kind: Pod
metadata: {name: hostnet-web, namespace: lab}
spec:
  hostNetwork: true
  containers:
  - name: web
    image: nginx
    ports: [{name: http, containerPort: 9000, hostPort: 9000, protocol: TCP}]
""",
    "stale-udp": _DNS_V1,
    "blackhole": _DNS_V1,          # the same pod; the scenario differs in what happens next
    "hairpin": """
apiVersion: v1
kind: Pod
metadata: {name: caller, namespace: lab}
spec:
  containers:
  - name: curl
    image: curl
""",
}


def _conflict_pod(plans: List[PodPlan]) -> str:
    for plan in plans:
        for p in plan.ports:
            if p.host_port and not plan.host_network:
                return f"""
apiVersion: v1
kind: Pod
metadata: {{name: {plan.name[:40]}-rival, namespace: {plan.namespace}}}
spec:
  containers:
  - name: rival
    image: nginx
    ports: [{{name: rival, containerPort: {p.container_port}, hostPort: {p.host_port}, protocol: {p.protocol}}}]
"""
    raise LabError("The conflict scenario needs a manifest with at least one hostPort on a pod network pod.")


# -- building blocks ------------------------------------------------------------------------
def _add_netns(st: LabState, ns: str) -> None:
    _run(["ip", "netns", "add", ns])
    st.namespaces.append(ns)
    st.save()
    _run(_nsexec(ns, "ip", "link", "set", "lo", "up"))
    # IPv6 duplicate address detection would hold addresses back for seconds; in a lab of
    # our own, no address can be a duplicate.
    for key in ("net.ipv6.conf.all.accept_dad", "net.ipv6.conf.default.accept_dad"):
        _run(_nsexec(ns, "sysctl", "-qw", f"{key}=0"), check=False)


def cni_path(st: LabState) -> str:
    """Where the lab's CNI plugins are: Debian's, or the nftables portmap's build (lab/plugins.py)."""
    if st.portmap == "nftables":
        from bpftrace_hostport.lab.plugins import nftables_plugins
        return str(nftables_plugins())
    return CNI_PATH


def _cni_conf(st: LabState) -> dict:
    ranges = [[{"subnet": st.pod_cidr}]]
    routes = [{"dst": "0.0.0.0/0"}]
    if st.ipv6:
        ranges.append([{"subnet": st.pod_cidr6}])
        routes.append({"dst": "::/0"})
    return {
        "cniVersion": "0.4.0",
        "name": f"bhp-{st.name}",
        "plugins": [
            {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": True,
             "hairpinMode": True,
             "ipam": {"type": "host-local", "ranges": ranges, "routes": routes,
                      "dataDir": str(st.dir / "ipam")}},
            dict({"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
                 **({"backend": "nftables"} if st.portmap == "nftables" else {}),
                 **(scenarios.get(st.scenario).portmap if scenarios.get(st.scenario) else {})),
        ],
    }


def _port_mappings(ports: List[dict]) -> List[dict]:
    out = []
    for p in ports:
        if p.get("host_port"):
            m = {"hostPort": p["host_port"], "containerPort": p["container_port"],
                 "protocol": p["protocol"].lower()}
            if p.get("host_ip"):
                m["hostIP"] = p["host_ip"]
            out.append(m)
    return out


def _cni(st: LabState, command: str, pod: LabPod) -> Optional[dict]:
    """Runs the plugin chain as a runtime does (libcni's chaining, prevResult passed along)."""
    conf = _cni_conf(st)
    plugins = conf["plugins"] if command == "ADD" else list(reversed(conf["plugins"]))
    prev = pod.cni_result
    path = cni_path(st)
    env = dict(os.environ, CNI_COMMAND=command, CNI_CONTAINERID=pod.container_id,
               CNI_NETNS=os.path.join(NETNS_DIR, pod.netns), CNI_IFNAME="eth0", CNI_PATH=path)
    for plugin in plugins:
        net = dict(plugin, cniVersion=conf["cniVersion"], name=conf["name"])
        if "capabilities" in plugin:
            net["runtimeConfig"] = {"portMappings": _port_mappings(pod.ports)}
        if prev:
            net["prevResult"] = prev
        p = subprocess.run(_nsexec(st.node_netns, os.path.join(path, plugin["type"])),
                           input=json.dumps(net), env=env, capture_output=True, text=True, timeout=30)
        if p.returncode != 0:
            msg = p.stdout.strip() or p.stderr.strip()
            with contextlib.suppress(ValueError):
                msg = json.loads(msg).get("msg", msg)
            if command == "DEL":
                continue   # DEL is best effort: the namespace goes anyway
            raise LabError(f"CNI {command} of pod {pod.namespace}/{pod.name} failed in the "
                           f"{plugin['type']} plugin: {msg[:300]}")
        if command == "ADD" and p.stdout.strip():
            prev = json.loads(p.stdout)
    return prev if command == "ADD" else None


def _start_process(st: LabState, ns: str, args: List[str], log: str, ready: bool) -> int:
    """Starts a lab process in a namespace, in its own session, and waits for its ready line."""
    logf = open(st.dir / log, "ab")
    r = w = None
    extra = []
    if ready:
        r, w = os.pipe()
        extra = ["--ready-fd", str(w)]
    try:
        proc = subprocess.Popen(_nsexec(ns, sys.executable, "-m", *args, *extra),
                                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                start_new_session=True, pass_fds=(w,) if w else ())
    finally:
        logf.close()
        if w is not None:
            os.close(w)
    st.pids.append(proc.pid)
    st.save()
    if ready:
        import select
        deadline = time.time() + 15
        got = b""
        while time.time() < deadline and b"ready" not in got:
            rl, _, _ = select.select([r], [], [], 0.2)
            if rl:
                chunk = os.read(r, 64)
                if not chunk:
                    break
                got += chunk
            if proc.poll() is not None and not rl:
                break
        os.close(r)
        if b"ready" not in got:
            tail = (st.dir / log).read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise LabError(f"A lab process ({args[0]}) did not start in {ns}: {tail[0]}")
    return proc.pid


def _server_args(pod: LabPod) -> List[str]:
    args = ["bpftrace_hostport.lab.servers", "--pod", f"{pod.namespace}/{pod.name}"]
    seen = set()
    for p in pod.ports:
        key = (p["protocol"], p["container_port"])
        if key in seen or p["protocol"] == "SCTP":
            continue   # SCTP gets its mapping, but the lab serves TCP and UDP only
        seen.add(key)
        args += ["--tcp" if p["protocol"] == "TCP" else "--udp", str(p["container_port"])]
    return args


def _pod_uid(st: LabState, namespace: str, name: str) -> str:
    uid = hashlib.md5(f"{st.run_id}/{namespace}/{name}".encode()).hexdigest()
    return f"{uid[:8]}-{uid[8:12]}-{uid[12:16]}-{uid[16:20]}-{uid[20:32]}"


def _add_containerd_pod(st: LabState, plan: PodPlan) -> LabPod:
    """The pod through CRI: containerd makes its namespace, runs CNI and starts its containers."""
    from bpftrace_hostport.lab import containerd
    pod = LabPod(plan.namespace, plan.name, None, None,
                 [ip for ip in (st.node_ip, st.node_ip6) if ip] if plan.host_network else [],
                 plan.host_network, [asdict(p) for p in plan.ports],
                 workload=plan.workload, labels=dict(plan.labels))
    st.pods.append(pod)
    st.save()
    containerd.run_pod(st.dir, pod, _pod_uid(st, plan.namespace, plan.name), list(plan.containers),
                       on_sandbox=lambda _pod: st.save())
    st.save()
    return pod


def _add_pod(st: LabState, plan: PodPlan, index: int) -> LabPod:
    if st.runtime == "containerd":
        return _add_containerd_pod(st, plan)
    ports = [asdict(p) for p in plan.ports]
    if plan.host_network:
        pod = LabPod(plan.namespace, plan.name, None, None,
                     [ip for ip in (st.node_ip, st.node_ip6) if ip], True, ports,
                     workload=plan.workload, labels=dict(plan.labels))
        st.pods.append(pod)
        st.save()
    else:
        ns = f"bhp-{st.name}-{st.run_id}-p{index}"
        cid = hashlib.sha256(f"{st.run_id}/{plan.namespace}/{plan.name}/{index}".encode()).hexdigest()
        pod = LabPod(plan.namespace, plan.name, ns, cid, [], False, ports,
                     workload=plan.workload, labels=dict(plan.labels))
        st.pods.append(pod)
        _add_netns(st, ns)
        result = _cni(st, "ADD", pod)
        pod.cni_result = result
        pod.ips = [i["address"].split("/")[0] for i in (result or {}).get("ips", [])]
        st.save()
    if any(p["protocol"] in ("TCP", "UDP") for p in pod.ports):
        pod.server_pid = _start_process(st, pod.netns or st.node_netns, _server_args(pod),
                                        f"server-{index}.log", ready=True)
    st.save()
    return pod


def _delete_pod(st: LabState, pod: LabPod) -> None:
    if st.runtime == "containerd":
        from bpftrace_hostport.lab import containerd
        containerd.remove_pod(st.dir, pod)
        pod.alive = False
        st.save()
        return
    if pod.server_pid:
        _kill(pod.server_pid)
    if pod.netns and os.path.exists(os.path.join(NETNS_DIR, pod.netns)):
        _cni(st, "DEL", pod)
        _run(["ip", "netns", "del", pod.netns], check=False)
    pod.alive = False
    st.save()


def _kill(pid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        for _ in range(20):
            try:
                os.kill(pid, 0)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
            except ProcessLookupError:
                return
            time.sleep(0.05)


def _write_pods(st: LabState) -> None:
    pods = []
    for p in st.live_pods():
        plan = PodPlan(namespace=p.namespace, name=p.name, workload=p.workload, labels=p.labels,
                       host_network=p.host_network,
                       containers=tuple(dict.fromkeys(x["container"] for x in p.ports)),
                       ports=tuple(ContainerPort(**x) for x in p.ports))
        uid = _pod_uid(st, p.namespace, p.name)
        start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(st.created))
        pod = plan_to_pod(plan, tuple(p.ips), st.node_name, uid=uid, start_time=start)
        if p.containers:     # containerd: the containers' own ids, as kubectl lists them
            pod = dataclasses.replace(pod, container_ids=tuple(c["id"] for c in p.containers))
        elif p.container_id:   # the sandbox id portmap put in its rule comments
            pod = dataclasses.replace(pod, container_ids=(p.container_id,))
        pods.append(pod)
    write_pod_list(pods, str(st.pods_file))


# -- public operations -----------------------------------------------------------------------
def up(manifests: Sequence[str] = (), name: str = "lab", scenario: str = "basic",
       clients: int = 1, ipv6: bool = True, manifest_text: Optional[str] = None,
       notes: Optional[List[str]] = None, runtime: str = "direct", portmap: str = "iptables",
       services: Optional[int] = None, conntrack_entries: Optional[int] = None) -> LabState:
    """Builds the lab; what a scheduler would warn about the pods goes into `notes`."""
    if not LAB_NAME_RE.match(name):
        raise LabError(f"Lab name {name!r} is not valid: use 1-12 lower-case letters, digits or dashes.")
    if scenario not in SCENARIOS:
        raise LabError(f"Unknown scenario {scenario!r}: choose one of {', '.join(SCENARIOS)}.")
    if not 1 <= clients <= 8:
        raise LabError("--clients must be between 1 and 8.")
    if runtime not in RUNTIMES:
        raise LabError(f"Unknown runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}.")
    if portmap not in PORTMAP_BACKENDS:
        raise LabError(f"Unknown portmap backend {portmap!r}: choose one of {', '.join(PORTMAP_BACKENDS)}.")
    spec = scenarios.get(scenario)
    if spec and spec.backend and portmap != spec.backend:
        if notes is not None:
            notes.append(f"Scenario {scenario} uses the {spec.backend} portmap.")
        portmap = spec.backend
    if spec and spec.ipv6 and not ipv6:
        raise LabError(f"Scenario {scenario} needs IPv6: leave out --no-ipv6.")
    if services is not None and not 0 <= services <= 100_000:
        raise LabError("--services must be between 0 and 100000.")
    if services is not None and scenario != "kube-proxy":
        raise LabError("--services goes with --scenario kube-proxy.")
    if portmap == "nftables":
        _check_nftables()
    else:
        check_prerequisites()
    if runtime == "containerd":
        from bpftrace_hostport.lab import containerd
        containerd.check_prerequisites()
    # Parse everything before building anything: bad input leaves nothing half-built.
    if manifest_text is not None:
        plans = parse_manifests(manifest_text, "<manifest>")
    else:
        plans = load_manifests(list(manifests) or [str(DEFAULT_MANIFEST)])
    if scenario == "conflict":
        plans += parse_manifests(_conflict_pod(plans), "<scenario conflict>")
    elif scenario in _SCENARIO_PODS:
        plans += parse_manifests(_SCENARIO_PODS[scenario], f"<scenario {scenario}>")
    elif spec and spec.pods:
        plans += parse_manifests(spec.pods, f"<scenario {scenario}>")
    names = [(p.namespace, p.name) for p in plans]
    if len(set(names)) != len(names):
        raise LabError("Two pods in the manifests would get the same namespace/name; rename one.")
    if notes is not None and scenario != "conflict":      # the conflict scenario is one on purpose
        notes.extend(scheduling_notes(plans))

    run_id = secrets.token_hex(2)
    STATE_ROOT.mkdir(parents=True, exist_ok=True)
    # One lab at a time picks its subnet and claims its name: two `lab up` at once never
    # get the same /16 or the same name.
    with open(STATE_ROOT / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (STATE_ROOT / name / "state.json").exists():
            raise LabError(f"A lab named {name!r} is already up: take it down with "
                           f"`bpftrace-hostport lab down --name {name}` or choose another --name.")
        _remove_orphans(name)      # namespaces of a run of this name that died unrecorded
        b = _subnet_for(name)
        st = _new_state(name, run_id, b, scenario, ipv6)
        st.runtime = runtime
        st.portmap = portmap
        st.services = (2000 if services is None else services) if scenario == "kube-proxy" else 0
        st.conntrack_entries = conntrack_entries
        st.dir.mkdir(parents=True, exist_ok=True)
        st.save()
    try:
        _build(st, plans, clients)
    except BaseException:
        with contextlib.suppress(Exception):
            down(name)
        raise
    return st


def _new_state(name: str, run_id: str, b: int, scenario: str, ipv6: bool) -> LabState:
    return LabState(name=name, run_id=run_id, subnet=b, scenario=scenario, ipv6=ipv6,
                    node_netns=f"bhp-{name}-{run_id}-node", node_name=f"lab-{name}",
                    node_ip=f"10.{b}.0.1", node_ip6=f"fd00:{b}::1" if ipv6 else None,
                    pod_cidr=f"10.{b}.1.0/24", pod_cidr6=f"fd00:{b}:1::/64" if ipv6 else None)


def _build(st: LabState, plans: List[PodPlan], clients: int) -> None:
    node = st.node_netns
    _add_netns(st, node)
    ex = lambda *c: _run(_nsexec(node, *c))  # noqa: E731
    ex("ip", "link", "add", "lan0", "type", "bridge")
    ex("ip", "addr", "add", f"{st.node_ip}/24", "dev", "lan0")
    if st.ipv6:
        ex("ip", "-6", "addr", "add", f"{st.node_ip6}/64", "dev", "lan0", "nodad")
        ex("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
    ex("ip", "link", "set", "lan0", "up")
    ex("sysctl", "-qw", "net.ipv4.ip_forward=1")
    for i in range(clients):
        cns = f"bhp-{st.name}-{st.run_id}-c{i}"
        _add_netns(st, cns)
        ip = f"10.{st.subnet}.0.{10 + i}"
        ip6 = f"fd00:{st.subnet}::{10 + i:x}" if st.ipv6 else None
        ex("ip", "link", "add", f"cl{i}", "type", "veth", "peer", "name", "eth0", "netns", cns)
        ex("ip", "link", "set", f"cl{i}", "master", "lan0", "up")
        cx = lambda *c: _run(_nsexec(cns, *c))  # noqa: E731
        cx("ip", "addr", "add", f"{ip}/24", "dev", "eth0")
        if ip6:
            cx("ip", "-6", "addr", "add", f"{ip6}/64", "dev", "eth0", "nodad")
        cx("ip", "link", "set", "eth0", "up")
        cx("ip", "route", "add", "default", "via", st.node_ip)
        if ip6:
            cx("ip", "-6", "route", "add", "default", "via", st.node_ip6)
        st.clients.append({"netns": cns, "ip": ip, "ip6": ip6})
        st.save()
    spec = scenarios.get(st.scenario)
    if spec and spec.before:
        spec.before(st)
    if st.runtime == "containerd":
        from bpftrace_hostport.lab import containerd
        containerd.start(st.dir, node, f"{st.name}-{st.run_id}", _cni_conf(st), cni_path(st))
    for i, plan in enumerate(plans):
        _add_pod(st, plan, i)
    _write_pods(st)
    if st.scenario == "forward-drop":
        # The classic: a node whose FORWARD policy drops what DNAT sends to the pods.
        ex("iptables", "-P", "FORWARD", "DROP")
        if st.ipv6:
            ex("ip6tables", "-P", "FORWARD", "DROP")
    elif st.scenario == "stale-udp":
        _stale_udp(st)
    elif st.scenario == "blackhole":
        _blackhole(st)
    elif spec and spec.after:
        spec.after(st)
        _write_pods(st)
    st.complete = True
    st.save()


def _start_streaming_client(st: LabState, log: str):
    """A UDP client that keeps sending to hostPort 5353 from a fixed port (10 a second, for up
    to an hour): it keeps its conntrack entry alive. Returns the dns-v1 pod it reaches first."""
    args = ["bpftrace_hostport.lab.traffic", "--host", st.node_ip, "--port", "5353", "--proto", "udp",
            "--source-port", str(STALE_UDP_SOURCE_PORT), "--count", "36000", "--rate", "10",
            "--timeout", "0.2", "--max-seconds", "3600", "--ready-after", "1"]
    _start_process(st, st.clients[0]["netns"], args, log, ready=True)
    time.sleep(0.3)
    return next(p for p in st.pods if p.name == "dns-v1")


def _stale_udp(st: LabState) -> None:
    """A UDP client keeps talking to hostPort 5353 while its pod is replaced by a new one.

    As in a rolling update that surges, the new pod's CNI ADD happens while the old pod still
    holds the mapping (portmap flushes UDP entries on ADD, but the client's next datagram
    meets the old pod's DNAT chain first and re-creates the entry to the old IP); then the old
    pod is deleted. The client keeps sending, so conntrack keeps the DNAT to the dead IP.
    """
    old = _start_streaming_client(st, "stale-udp-client.log")
    plan = parse_manifests(_SCENARIO_PODS["stale-udp"].replace("dns-v1", "dns-v2"), "<scenario>")[0]
    _add_pod(st, plan, len(st.pods))
    time.sleep(0.3)          # the client's next datagrams re-create the entry to the old pod
    _delete_pod(st, old)
    _write_pods(st)


BLACKHOLE_NODE_POD = """
apiVersion: v1
kind: Pod
metadata: {name: dns-node, namespace: lab}
spec:
  hostNetwork: true
  containers:
  - name: dns
    image: coredns
"""


def _blackhole(st: LabState) -> None:
    """containernetworking/plugins#1190: a UDP hostPort pod is replaced by a hostNetwork server.

    A UDP client streams to hostPort 5353 from a fixed port; dns-v1 (hostPort 5353 -> 53) is
    deleted (CNI DEL removes its rules, not the client's conntrack entry) and a hostNetwork pod
    dns-node, which lists no ports, serves UDP 5353 on the node itself. The client keeps sending,
    so its entry keeps DNATing to dns-v1's dead IP: a blackhole, while new clients reach dns-node.
    No pod declares 5353 any more and no rule for it exists.
    """
    old = _start_streaming_client(st, "blackhole-client.log")
    _delete_pod(st, old)
    plan = parse_manifests(BLACKHOLE_NODE_POD, "<scenario blackhole>")[0]
    pod = _add_pod(st, plan, len(st.pods))
    # Its container listens on UDP 5353 of the node although the pod lists no port.
    pod.server_pid = _start_process(st, st.node_netns, ["bpftrace_hostport.lab.servers", "--pod",
                                                        f"{pod.namespace}/{pod.name}", "--udp", "5353"],
                                    f"server-{len(st.pods) - 1}.log", ready=True)
    st.save()
    _write_pods(st)


def down(name: str) -> List[str]:
    """Removes everything the lab created; idempotent. Returns what was removed."""
    removed: List[str] = []
    st = None
    with contextlib.suppress(LabError):
        st = LabState.load(name)
    if st is not None:
        for pid in st.pids:
            _kill(pid)
    # containerd: every sandbox through CRI, then containerd itself; from its own files, so also
    # when the state file is gone (lab/containerd.py).
    from bpftrace_hostport.lab import containerd
    removed += containerd.remove(STATE_ROOT / name)
    if st is not None:
        for pod in st.pods:
            if pod.alive and pod.netns and pod.container_id and \
                    os.path.exists(os.path.join(NETNS_DIR, st.node_netns)) and \
                    os.path.exists(os.path.join(NETNS_DIR, pod.netns)):
                _cni(st, "DEL", pod)
        for ns in reversed(st.namespaces):
            if os.path.exists(os.path.join(NETNS_DIR, ns)):
                _kill_netns_procs(ns)
                _run(["ip", "netns", "del", ns], check=False)
                removed.append(ns)
    removed += _remove_orphans(name)
    shutil.rmtree(STATE_ROOT / name, ignore_errors=True)
    return removed


def _kill_netns_procs(ns: str) -> None:
    p = _run(["ip", "netns", "pids", ns], check=False)
    for pid in p.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def _remove_orphans(name: str) -> List[str]:
    """Namespaces of this lab left by a run that died before it could record them."""
    removed = []
    if not os.path.isdir(NETNS_DIR):
        return removed
    for ns in sorted(os.listdir(NETNS_DIR)):
        if re.match(rf"^bhp-{re.escape(name)}-[0-9a-f]{{4}}-(node|c\d+|p\d+)$", ns):
            _kill_netns_procs(ns)
            _run(["ip", "netns", "del", ns], check=False)
            removed.append(ns)
    return removed


def list_labs() -> List[str]:
    names = set()
    if STATE_ROOT.exists():
        names |= {d.name for d in STATE_ROOT.iterdir() if (d / "state.json").exists()}
    if os.path.isdir(NETNS_DIR):
        for ns in os.listdir(NETNS_DIR):
            m = re.match(r"^bhp-([a-z0-9-]+)-[0-9a-f]{4}-(node|c\d+|p\d+)$", ns)
            if m:
                names.add(m.group(1))
    return sorted(names)


def status(name: str) -> dict:
    st = LabState.load(name)
    out = st.summary()
    out["complete"] = st.complete
    out["namespaces_present"] = [ns for ns in st.namespaces if os.path.exists(os.path.join(NETNS_DIR, ns))]
    alive = []
    for p in st.pods:
        if p.alive and p.server_pid:
            try:
                os.kill(p.server_pid, 0)
                alive.append(p.name)
            except ProcessLookupError:
                pass
    out["servers_running"] = alive
    return out


def traffic(name: str, to: Optional[int] = None, count: int = 10, rate: float = 0.0,
            concurrency: int = 1, source: str = "client", proto: Optional[str] = None,
            family: int = 4, target: Optional[str] = None, timeout: float = 2.0,
            source_port: Optional[int] = None, max_seconds: float = 120.0,
            port_base: Optional[int] = None) -> dict:
    """Real requests through a hostPort; returns sent / answered / failed and who answered
    (port_base: each request from its own client port, and what each one saw: traffic.py)."""
    st = LabState.load(name)
    mappings = [(p, m) for p in st.live_pods() for m in p.ports if m.get("host_port")]
    if not mappings:
        raise LabError(f"Lab {name!r} has no hostPort mapping to send traffic to: bring it up with a manifest "
                       f"whose pods declare a hostPort (lab down --name {name}, then lab up MANIFEST).")
    if to is None:
        pod, m = mappings[0]
    else:
        match = [(p, m) for p, m in mappings if m["host_port"] == to and
                 (proto is None or m["protocol"].lower() == proto)]
        if not match:
            have = ", ".join(sorted({f"{m['host_port']}/{m['protocol'].lower()}" for _, m in mappings}))
            raise LabError(f"Lab {name!r} has no hostPort {to}{'/' + proto if proto else ''}: give --to with one "
                           f"of {have}.")
        pod, m = match[0]
    proto = (proto or m["protocol"]).lower()
    if proto not in ("tcp", "udp"):
        raise LabError(f"The lab sends TCP or UDP traffic only, and hostPort {m['host_port']} is "
                       f"{proto.upper()}: give --to with a TCP or UDP hostPort.")
    if family == 6 and not st.ipv6:
        raise LabError(f"Lab {name!r} was built without IPv6: leave out --ipv6, or bring the lab up again "
                       "without --no-ipv6.")
    if source == "client":
        ns = st.clients[0]["netns"]
    elif source == "node":
        ns = st.node_netns
    elif source == "pod":
        callers = [p for p in st.live_pods() if not p.host_network and p.netns]
        caller = next((p for p in callers if p.name == "caller"), callers[0] if callers else None)
        if caller is None:
            raise LabError(f"Lab {name!r} has no pod network pod to send from: use --from client or --from node "
                           "(--scenario hairpin has a pod that calls).")
        ns = caller.netns
    else:
        raise LabError("--from must be client, node or pod: give one of them.")
    if target is None:
        target = "localhost" if (st.scenario == "localhost" and source == "node") else "node"
    if target == "localhost":
        if source != "node":
            raise LabError("Only the node itself can reach a hostPort on localhost: add --from node.")
        host = "127.0.0.1" if family == 4 else "::1"
    else:
        host = st.node_ip if family == 4 else st.node_ip6
    args = [sys.executable, "-m", "bpftrace_hostport.lab.traffic", "--host", host,
            "--port", str(m["host_port"]), "--proto", proto, "--count", str(count),
            "--rate", str(rate), "--concurrency", str(concurrency), "--timeout", str(timeout),
            "--max-seconds", str(max_seconds)]
    if source_port:
        args += ["--source-port", str(source_port)]
    if port_base:
        args += ["--port-base", str(port_base)]
    p = _run(_nsexec(ns, *args), timeout=max_seconds + timeout + 30, check=False)
    if p.returncode != 0:
        raise LabError(f"The traffic generator failed in {ns} ({p.stderr.strip()[-300:]}); see whether the lab "
                       f"is whole with `bpftrace-hostport lab status --name {name}`.")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res.update({"from": source, "from_netns": ns, "to": endpoint_proto(host, m["host_port"], proto),
                "expected_pod": f"{pod.namespace}/{pod.name}"})
    return res
