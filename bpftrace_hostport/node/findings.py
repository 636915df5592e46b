"""Every finding `check` can report, declared once: code, severities, family, title, explanation
and fix templates (REGISTRY). The checks (node/checks/) fill the templates with the node's real
values; README's findings table is generated from this registry (a test keeps them equal), and
`codes()` is the list the fleet's alerts and dashboard are tested against.

A fix template is str.format text: `{name}` is a value the check knows (an address, a port, a
chain, the command prefix of the node's namespace, `{px}`), commands are in backticks (the CLI
prints each on a line of its own, ready to paste). Where a value cannot be known on the node, the
template says so in words instead of leaving a placeholder.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

__all__ = ["Finding", "Spec", "REGISTRY", "SEVERITIES", "FAMILIES", "codes", "finding", "fix_text",
           "has_errors", "markdown_table"]

SEVERITIES = ("error", "warning", "info")

#: The families the checks are split by (node/checks/<family>.py).
FAMILIES = {
    "forward": "forward path",
    "nat": "NAT plumbing",
    "conntrack": "conntrack",
    "pods": "pods and ports",
    "localhost": "localhost",
}


@dataclass(frozen=True)
class Spec:
    code: str
    severities: Tuple[str, ...]      # those it can have, the usual one first
    family: str                      # a key of FAMILIES
    title: str                       # one line: what is wrong
    explanation: str                 # why it breaks hostPort traffic, and how the node shows it
    fixes: Mapping[str, str]         # variant -> fix template ("default" always present)


@dataclass
class Finding:
    severity: str                   # "error" | "warning" | "info"
    code: str                       # stable kebab-case id, a key of REGISTRY
    message: str                    # what is wrong, in one or two sentences
    evidence: List[str] = field(default_factory=list)
    fix: Optional[str] = None       # sentences, exact commands in backticks

    def to_dict(self) -> dict:
        return asdict(self)


def has_errors(found: Iterable[Finding]) -> bool:
    return any(f.severity == "error" for f in found)


_SPECS = [
    # ------------------------------------------------------------------ forward path
    Spec("ip-forward-off", ("error",), "forward",
         "`net.ipv4.ip_forward` is 0",
         "Packets DNATed to pods are never forwarded, so clients from other hosts get no answer on any "
         "hostPort (only the node itself reaches them).",
         {"default": "Turn forwarding on: `{px}sysctl -w {key}=1` (and persist it in /etc/sysctl.d/)."}),
    Spec("ipv6-forwarding-off", ("error",), "forward",
         "`net.ipv6.conf.all.forwarding` is 0",
         "The same for IPv6: hostPort traffic DNATed to a pod's IPv6 address is never forwarded.",
         {"default": "Turn forwarding on: `{px}sysctl -w {key}=1` (and persist it in /etc/sysctl.d/)."}),
    Spec("forward-drop", ("error",), "forward",
         "the forward path drops or rejects DNATed pod traffic",
         "A rule of the FORWARD chain (iptables, both backends) or of an nftables forward-hook chain "
         "(firewalld's nft backend, a hand-written `inet filter`) drops or rejects what DNAT sends to a "
         "pod, or its replies; or the chain's policy drops it because nothing accepts it first. Hosts "
         "other than the node never get an answer.",
         {"rule": "Remove that rule if it is not meant for pod traffic: {commands}; or narrow it so that "
                  "it spares traffic to the pods (for instance with \"-m conntrack ! --ctstate DNAT\").",
          "nft-rule": "Let DNATed traffic pass before that rule: {commands}.{owner}",
          "policy": "Nothing accepts pod traffic before the policy drops it; accept it: {commands} (a "
                    "CNI firewall plugin or your firewall's configuration should add these).",
          "nft-policy": "Accept pod traffic: {commands}."}),
    # ------------------------------------------------------------------ NAT plumbing
    Spec("hostport-chain-not-hooked", ("error", "warning"), "nat",
         "portmap's hostPort rules are not reached from PREROUTING or OUTPUT",
         "portmap's rules exist (CNI-HOSTPORT-DNAT with its per-pod chains, or the nftables table "
         "cni_hostport), but the hook does not lead to them (firewalld or an iptables restore flushed "
         "the jump): they never apply to clients from other hosts (PREROUTING, an error) or to the node "
         "itself (OUTPUT, a warning).",
         {"default": "Add the entry jump{s}: {commands}."}),
    Spec("hairpin-no-masquerade", ("warning", "info"), "nat",
         "pods calling a hostPort on their own node are not masqueraded",
         "portmap masquerades hairpin traffic (a pod calling nodeIP:hostPort that leads back to a pod "
         "on the same bridge) with CNI-HOSTPORT-SETMARK and CNI-HOSTPORT-MASQ; with a piece missing "
         "(or `\"snat\": false`) a pod calling its own hostPort gets no answer.",
         {"restore": "Restore the missing pieces: {commands} (or re-create the pods).",
          "recreate": "Re-create the pods so portmap's CNI ADD rebuilds its chains.",
          "snat-off": "Set \"snat\": true in the portmap plugin's config if pods call hostPorts on their own "
                      "node{extra}."}),
    Spec("bridge-nf-call-iptables-off", ("warning",), "nat",
         "hairpin replies are bridged past conntrack",
         "portmap runs without snat and br_netfilter's bridge-nf-call-iptables is 0: a pod calling "
         "another pod's hostPort on the same bridge gets the reply straight from that pod, never "
         "un-DNATed, and drops it.",
         {"default": "Turn it on: `{px}sysctl -w {key}=1`, or set \"snat\": true in the portmap plugin's config."}),
    Spec("mark-masq-missing", ("warning",), "nat",
         "portmap marks hairpin traffic for KUBE-MARK-MASQ, but nothing masquerades that mark",
         "With `\"externalSetMarkChain\": \"KUBE-MARK-MASQ\"` portmap leaves the masquerade to "
         "kube-proxy's mark 0x4000 and KUBE-POSTROUTING. kube-proxy no longer provides those chains "
         "for others (KEP-3178; its nftables and IPVS modes, or kube-proxy gone): then hairpin and "
         "localhost calls to hostPorts lose their masquerade (cri-o#6772, plugins#770). Earlier "
         "versions of this tool called this \"snat off\".",
         {"default": "Masquerade what is marked, as kube-proxy did: {commands}; the lasting fix is to drop "
                     "\"externalSetMarkChain\" from the portmap plugin's config so portmap uses its own "
                     "CNI-HOSTPORT-SETMARK / CNI-HOSTPORT-MASQ chains."}),
    Spec("hostport-catches-clusterip", ("error",), "nat",
         "a hostPort rule without hostIP also catches Service ClusterIPs bound on kube-ipvs0",
         "portmap jumps to CNI-HOSTPORT-DNAT for every local destination (`-m addrtype --dst-type "
         "LOCAL`). kube-proxy's IPVS mode binds every ClusterIP to the dummy interface kube-ipvs0, so "
         "those are local too: a connection to ClusterIP:P is DNATed to the pod with hostPort P "
         "instead of reaching the Service (kubernetes#66103, plugins#222). Found where an IPVS virtual "
         "service (/proc/net/ip_vs) or a socket on a ClusterIP uses the hostPort's number.",
         {"default": "Stop the hostPort rules from taking ClusterIP traffic: {commands} (these stay until "
                     "portmap's chains are flushed); the lasting fix is to give pod {pod} a hostIP (the "
                     "node's address, {node_ip}) so its rule matches that address only, or another "
                     "hostPort than the Service's port."}),
    Spec("hostport-catches-transit", ("error",), "nat",
         "the nftables portmap's prerouting jump catches traffic that only passes through the node",
         "portmap's nftables backend of plugins 1.6.1 to 1.8.x jumps from its prerouting chain to the "
         "hostPort rules without `fib daddr type local` (plugins#1209, fixed by PR #1210 in 1.9.0): "
         "every forwarded packet to a hostPort number (a pod calling another node, transit traffic) "
         "is DNATed to the hostPort's pod.",
         {"default": "Jump only for local destinations: {commands}; upgrade the CNI plugins to 1.9.0 or "
                     "later for good (its portmap writes that rule itself)."}),
    # ------------------------------------------------------------------ conntrack
    Spec("stale-conntrack", ("error", "warning"), "conntrack",
         "conntrack entries DNAT a hostPort to an IP that is no longer its pod",
         "A UDP (or SCTP) client that keeps sending keeps its conntrack entry alive, and the entry "
         "still DNATs to the pod that was replaced; when no rule for the port exists any more and a "
         "socket on the node now listens on it, the entry is a blackhole (plugins#1190).",
         {"default": "Delete {them}: `{px}conntrack -D {fam}-p {proto} --orig-dst {dst} --dport {port} "
                     "--reply-src {dead}`{after}."}),
    Spec("conntrack-pinned-to-node", ("error",), "conntrack",
         "UDP entries for a hostPort were made without DNAT and keep its client on the node",
         "A UDP client that started while the DNAT rule or its jump was missing (a firewall reload, "
         "a CNI ADD still running) got a conntrack entry to the node itself. Every datagram "
         "refreshes it, so the client never reaches the pod although the rule is back "
         "(projectcalico/felix#1880, moby#44742, kubernetes#93091).",
         {"default": "Delete {them}: `{px}conntrack -D {fam}-p {proto} --orig-dst {dst} --dport {port} "
                     "--reply-src {dst}` (the client's next datagram then meets the DNAT rule)."}),
    Spec("conntrack-table-full", ("error", "warning"), "conntrack",
         "the conntrack table is full or nearly so",
         "When nf_conntrack_count reaches nf_conntrack_max the kernel drops new connections (`conntrack "
         "-S` counts them as drop, early_drop, insert_failed): hostPort clients among them. The count "
         "is kept per network namespace, the limit is one for the whole host.",
         {"default": "Make room: {relief}raise the limit for the host, in its own namespace: "
                     "`sysctl -w net.netfilter.nf_conntrack_max={new_max}` (persist it in /etc/sysctl.d/; it "
                     "is one limit for every namespace{global_note})."}),
    # ------------------------------------------------------------------ pods and ports
    Spec("hostnetwork-hostport", ("info", "warning"), "pods",
         "a hostNetwork pod declares a hostPort",
         "A hostNetwork pod gets no DNAT rule: its own socket on the node serves the port. A warning "
         "when nothing listens there or when the hostPort differs from the containerPort (then nothing "
         "answers on the hostPort).",
         {"default": "Nothing to fix: with hostNetwork the hostPort only reserves the port for the scheduler.",
          "fix": "To fix: {fixes}."}),
    Spec("hostport-no-rule", ("error", "info"), "pods",
         "a running pod's declared hostPort has no DNAT rule",
         "portmap is not chained in the CNI config, the runtime did not pass the port mappings, or the "
         "rules were flushed: clients of the port get no answer, or reach another pod. Only info when "
         "an eBPF datapath (Cilium, Calico eBPF) may serve it without nat rules.",
         {"default": "Recreate the pod so its runtime runs the CNI ADD again (`kubectl -n {namespace} delete "
                     "pod {name}`), and check that the CNI config chains the portmap plugin with "
                     "\"capabilities\": {{\"portMappings\": true}}."}),
    Spec("hostport-one-family", ("error",), "pods",
         "a dual-stack pod's hostPort has a DNAT rule for one address family only",
         "The pod has IPv4 and IPv6 addresses, but its hostPort is DNATed for one family only (an old "
         "portmap, a runtime that passed one family, a lost ip6tables restore): clients of the other "
         "family get nothing (kubernetes#80810, plugins#378).",
         {"default": "Add the missing {fam} mapping: {commands} (what portmap would have written; "
                     "re-creating the pod with a dual-stack aware runtime and portmap also restores it)."}),
    Spec("leaked-hostport-rule", ("error",), "pods",
         "a DNAT rule points at an IP no live pod has",
         "The leftover of a pod whose CNI DEL never ran (a node crash, a runtime bug): it still takes "
         "the hostPort, so its traffic goes nowhere (plugins#752, #683).",
         {"iptables": "Remove the leftover chain and its jumps (what the missing CNI DEL would have done): "
                      "`{command}`.",
          "nftables": "Delete its rules from the portmap table: {commands}.",
          "crio": "Restart CRI-O (`systemctl restart crio`) so it re-syncs its hostport rules with its sandboxes.",
          "docker": "Restart Docker (`systemctl restart docker`) so it rebuilds its DOCKER chain from running "
                    "containers.",
          "default": "Delete the DNAT rules to {ip} from chain {chain}."}),
    Spec("no-pod-metadata", ("info",), "pods",
         "no pod list, so leaked rules cannot be judged",
         "Without the pods, a rule of a pod that is gone cannot be told from a live one, and declared "
         "hostPorts without rules cannot be seen.",
         {"default": "Give the pods of node {node}: `kubectl get pods -A -o json --field-selector "
                     "spec.nodeName={node} > {file}` (wherever kubectl works), then `{rerun} --pods {file}`; "
                     "or `{rerun} --pods-from kube` on a machine with a kubeconfig.{node_note}"}),
    Spec("hostport-conflict", ("error",), "pods",
         "two rules or pods claim one (proto, hostIP, hostPort)",
         "Only the first DNAT rule that matches takes new connections; a hostNetwork pod's socket on "
         "the same port never sees them (kubernetes#39228, #51950).",
         {"pod": "Give {pod} another hostPort or delete it ({how_delete}); two pods with one hostPort only "
                 "land on a node when something bypasses the scheduler (static pods, spec.nodeName).",
          "default": "Remove the rules that point at no live pod (see leaked-hostport-rule)."}),
    Spec("pod-not-listening", ("error",), "pods",
         "nothing listens on the containerPort in the hostPort's pod",
         "The DNAT rule is fine, but the pod refuses: TCP clients get a reset, UDP clients an ICMP port "
         "unreachable (or nothing). Read from the pod's own network namespace; a server listening "
         "on 127.0.0.1 only inside the pod counts as not listening (kubernetes#42960).",
         {"default": "Make the container listen on port {port} on all its addresses: its logs say why it "
                     "does not (`kubectl -n {namespace} logs {name}{container}`), and "
                     "`{nsx}ss -{ssopt}lnp` shows what listens in the pod now."}),
    Spec("node-socket-shadowed", ("warning",), "pods",
         "a process of the node listens on a port that a DNAT rule takes first",
         "DNAT happens before local delivery, so remote clients of that port always reach the pod, "
         "never the node's own daemon (cri-o PR #847). Only clients on the node itself calling "
         "127.0.0.1 may still reach it.",
         {"default": "Only one of them can have port {port} on the node's addresses. If the daemon should: "
                     "give pod {pod} another hostPort; until then `{command}` hands the port back to the "
                     "daemon (and takes it from the pod). If the pod should: move the daemon to another port."}),
    # ------------------------------------------------------------------ localhost
    Spec("localhost-route-localnet-off", ("warning", "info"), "localhost",
         "127.0.0.1:hostPort needs route_localnet=1 on the pods' bridge",
         "OUTPUT DNATs a call to 127.0.0.1:hostPort, but without route_localnet the kernel refuses to "
         "send a 127.0.0.1-sourced packet out to the pod (plugins#763). A warning when portmap expects "
         "it (snat on) or the node makes such calls.",
         {"default": "Allow it: {commands} (portmap sets it when snat is on), or call the node's IP instead of "
                     "127.0.0.1."}),
    Spec("localhost-hostport", ("info",), "localhost",
         "the node reaches hostPorts on 127.0.0.1; ::1 cannot work",
         "OUTPUT DNATs them, route_localnet=1 lets the packets out, portmap's masquerade rewrites their "
         "source. The same call on [::1] cannot work: IPv6 has no route_localnet.",
         {"default": "Nothing to fix; from the node use 127.0.0.1 or the node's IP for hostPorts, never ::1."}),
    Spec("localhost-ipv6", ("warning",), "localhost",
         "the node calls [::1]:hostPort, which cannot work",
         "DNAT sends it to a pod, but a packet from ::1 may never leave the host (podman#12690).",
         {"default": "Call 127.0.0.1 or the node's IPv6 address instead of ::1 ({commands})."}),
    Spec("route-localnet-exposed", ("warning",), "localhost",
         "route_localnet=1 on an interface facing the network, without the martian drop rule",
         "With route_localnet=1 a host on the network can send to 127.0.0.1 through this interface "
         "and reach every service of the node bound to 127.0.0.1 (kubelet's, a database's). kube-proxy "
         "adds `KUBE-FIREWALL` to drop such packets (kubernetes#90259, PR #91569); nothing here "
         "does.",
         {"default": "Drop them as kube-proxy does: {commands}; or turn route_localnet off where it is "
                     "not needed ({off})."}),
]

REGISTRY: Dict[str, Spec] = {s.code: s for s in _SPECS}


def codes() -> List[str]:
    """Every finding code, in the registry's order (by family)."""
    return list(REGISTRY)


def fix_text(code: str, variant: str = "default", **values) -> str:
    """The fix of `code` (its `variant`) filled with the node's values."""
    return REGISTRY[code].fixes[variant].format(**values)


def finding(code: str, message: str, evidence: Iterable[str] = (), *, severity: Optional[str] = None,
            variant: Optional[str] = "default", fix: Optional[str] = None, **values) -> Finding:
    """A Finding of a registered code; its fix from the registry's template unless `fix` is given."""
    spec = REGISTRY[code]
    sev = severity or spec.severities[0]
    if sev not in spec.severities:
        raise ValueError(f"{code} is declared with severities {spec.severities}, not {sev}")
    if fix is None and variant is not None:
        fix = fix_text(code, variant, **values)
    return Finding(sev, code, message, list(evidence), fix)


def markdown_table() -> str:
    """README's findings table: one row per code, by family."""
    lines = ["| code | severity | family | what is wrong | why, and how the node shows it |",
             "| --- | --- | --- | --- | --- |"]
    for s in _SPECS:
        lines.append(f"| `{s.code}` | {' or '.join(s.severities)} | {FAMILIES[s.family]} | {s.title} | "
                     f"{s.explanation} |")
    return "\n".join(lines) + "\n"
