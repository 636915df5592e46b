"""NodeViews from the scenario fixtures (tests/fixtures/check/lab-<scenario>/, made by
capture_scenarios.py): what node/gather.py read on a real lab, rebuilt without a kernel."""
import json
from pathlib import Path

from bpftrace_hostport.node.nodeview import NodeView
from bpftrace_hostport.node.parse import (CtEntry, filter_table, nat_summary, parse_conntrack_stats,
                                          parse_conntrack_text, parse_sysctl_text)
from bpftrace_hostport.node.read import Netfilter
from bpftrace_hostport.node.rules import rules_of
from bpftrace_hostport.pods.podlist import read_pod_list

FX = Path(__file__).resolve().parents[2] / "fixtures" / "check"


def _text(d: Path, name: str) -> str:
    p = d / name
    return p.read_text() if p.exists() else ""


def scenario_view(scenario: str, netns: bool = True) -> NodeView:
    d = FX / f"lab-{scenario}"
    node = json.loads((d / "node.json").read_text())
    nf = Netfilter()
    for kind in ("nat", "filter"):
        for fam, suffix in ((4, ""), (6, "6")):
            text = _text(d, f"{kind}{suffix}.rules")
            if text:
                getattr(nf, kind).append(("iptables-nft", fam, text))
    nf.nft_items = json.loads(_text(d, "nft.json") or '{"nftables": []}')["nftables"]
    view = NodeView(
        netns=node["netns"] if netns else None, node_name=node["node_name"], rules=rules_of(nf),
        pods=read_pod_list(str(d / "pods.json")), pods_known=True,
        conntrack=parse_conntrack_text(_text(d, "conntrack.txt")), conntrack_read=True,
        conntrack_stats=parse_conntrack_stats(_text(d, "conntrack-stats.txt")),
        sysctls=parse_sysctl_text(_text(d, "sysctl.txt")),
        nat=[nat_summary(t, s, f) for s, f, t in nf.nat], filters=[filter_table(t, s, f) for s, f, t in nf.filter],
        nft_items=nf.nft_items, local_addresses=node["local_addresses"], address_ifaces=node["address_ifaces"],
        bridges=node["bridges"], interfaces=node["interfaces"], mtus=node["mtus"], routes=node["routes"],
        listening=[tuple(x) for x in node["listening"]],
        socket_owners={tuple(k): v for k, v in node["socket_owners"]}, sockets_read=True,
        pod_sockets={ip: (how, [tuple(s) for s in socks]) for ip, (how, socks) in node["pod_sockets"].items()},
        ipvs_services=[tuple(x) for x in node["ipvs_services"]], ipvs_read=node["ipvs_read"],
        netns_is_host=node["netns_is_host"], legacy_tables={int(k): v for k, v in node["legacy_tables"].items()},
        conntrack_sample=[CtEntry(**{**e, "status": tuple(e["status"])}) for e in node["conntrack_sample"]],
        target_args=["--lab", node["node_name"][4:]])
    return view
