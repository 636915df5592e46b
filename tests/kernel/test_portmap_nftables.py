"""trace on a lab whose hostPorts come from portmap's nftables backend (table cni_hostport, plugins
1.9.1 fetched by lab/plugins.py): its rules are read for the watch list and the recording, and
every flow through them is traced with its pod. Needs bcc and the netfilter link (the tracer);
with CI=true a plugins build that cannot be fetched is a failure."""
import pytest

from bpftrace_hostport.lab import build as lab
from tests.conftest import require_kernel
from tests.kernel.helpers import tracing, unique
from tests.kernel.test_check_findings import _need_nft_plugins

pytestmark = pytest.mark.kernel


def test_trace_names_the_pods_of_nftables_portmap_rules(tmp_path):
    require_kernel()
    _need_nft_plugins()
    name = unique("nt")
    lab.down(name)
    st = lab.up(name=name, portmap="nftables")
    try:
        pod = st.pods[0]
        rec = tmp_path / "nft.arrow"
        with tracing("--lab", name, "--timeout", "1", "--record", str(rec)) as t:
            a = lab.traffic(name, to=8000, count=5)
            b = lab.traffic(name, to=44300, count=3, family=6)
        assert a["answered"] == 5 and b["answered"] == 3
        assert t.returncode == 0, t.stderr
        flows = t.flows
        assert sorted((f["host_port"], f["family"]) for f in flows) == [(8000, 4)] * 5 + [(44300, 6)] * 3
        assert all(f["pod_name"] == pod.name and f["answered"] for f in flows)
        assert {f["pod_ip"] for f in flows} == set(pod.ips)
        assert t.summary["lost_events"] == 0
        # the recording's rules snapshot holds the cni_hostport rules, as read for the watch list
        from bpftrace_hostport.records.reader import load
        cap = load([str(rec)])
        (snap,) = [s for s in cap.snapshots if s["kind"] == "rules"]
        assert {(r["host_port"], r["family"], r["source"]) for r in snap["items"]} == {
            (hp, fam, "nftables") for hp in (8000, 44300) for fam in (4, 6)}
    finally:
        lab.down(name)
