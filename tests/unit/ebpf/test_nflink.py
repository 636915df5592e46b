"""ebpf/nflink.py without a kernel: who holds a netfilter priority (fdinfo as this kernel prints
it), and the choice of a free priority when another tracer holds the first one."""
import errno
import os

import pytest

from bpftrace_hostport.ebpf import nflink

# /proc/PID/fdinfo/FD of a netfilter link, as Linux 6.18 printed it here
FDINFO = ("pos:\t0\nflags:\t02000000\nmnt_id:\t17\nino:\t1039\nlink_type:\tnetfilter\nlink_id:\t3137\n"
          "prog_tag:\tb11459a0e11ca14c\nprog_id:\t2999\npf:\t2\thooknum:\t0\tprio:\t-99\n")


def test_parse_fdinfo():
    assert nflink.parse_fdinfo(FDINFO) == (3137, 2, 0, -99)
    assert nflink.parse_fdinfo(FDINFO.replace("netfilter", "tracing")) is None
    assert nflink.parse_fdinfo("pos:\t0\n") is None


def fake_proc(tmp_path, procs):
    """procs: pid -> (argv, [fdinfo text of each bpf link fd], other fds)."""
    for pid, (argv, links, others) in procs.items():
        d = tmp_path / str(pid)
        (d / "fd").mkdir(parents=True)
        (d / "fdinfo").mkdir()
        (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
        for i, text in enumerate(links):
            os.symlink("anon_inode:bpf_link", d / "fd" / str(10 + i))
            (d / "fdinfo" / str(10 + i)).write_text(text)
        for i, target in enumerate(others):
            os.symlink(target, d / "fd" / str(i))
            (d / "fdinfo" / str(i)).write_text("pos:\t0\n")
    (tmp_path / "self").mkdir()
    return str(tmp_path)


def test_the_holder_of_a_priority_is_named(tmp_path):
    agent = ["/usr/bin/python3", "-m", "bpftrace_hostport", "agent", "--lab", "demo", "--log-json"]
    proc = fake_proc(tmp_path, {
        1234: (agent, [FDINFO, FDINFO.replace("hooknum:\t0", "hooknum:\t3")], ["/dev/null", "anon_inode:bpf-map"]),
        77: (["/usr/sbin/other-tool", "x"], [FDINFO.replace("prio:\t-99", "prio:\t-50")], []),
    })
    holders = nflink.link_holders(proc)
    assert sorted((h.pid, h.hook, h.priority) for h in holders) == [(77, 0, -50), (1234, 0, -99), (1234, 3, -99)]
    assert nflink.who_holds(2, 0, -99, proc=proc) == \
        "bpftrace-hostport pid 1234 (agent --lab demo) is attached at priority -99"
    assert nflink.who_holds(2, 0, -50, proc=proc) == "pid 77 (other-tool) is attached at priority -50"
    script = nflink.Holder(5, 1, 2, 0, -99, ("/venv/bin/python", "/usr/local/bin/bpftrace-hostport", "trace"))
    assert nflink.describe_holder(script) == "bpftrace-hostport pid 5 (trace)"


def test_only_the_holders_in_the_namespace_count(tmp_path, monkeypatch):
    """The kernel does not say which namespace a link is in: a tracer of ours holds its
    namespace open (net:[inode]); another process's links are taken to be in its own."""
    lab = ["python3", "-m", "bpftrace_hostport", "trace", "--lab", "a"]
    proc = fake_proc(tmp_path, {10: (lab, [FDINFO], ["net:[111]"]),
                                11: (lab[:-1] + ["b"], [FDINFO.replace("3137", "3138")], ["net:[222]"]),
                                12: (["other"], [FDINFO.replace("3137", "3139")], [])})
    (tmp_path / "12" / "ns").mkdir()                     # no net:[] fd: its own namespace's
    os.symlink("net:[333]", tmp_path / "12" / "ns" / "net")
    assert nflink.who_holds(2, 0, -99, 111, proc=proc) == \
        "bpftrace-hostport pid 10 (trace --lab a) is attached at priority -99"
    assert nflink.who_holds(2, 0, -99, 333, proc=proc) == "pid 12 (other) is attached at priority -99"
    # the kernel's list has those three links and one held by no visible process
    monkeypatch.setattr(nflink, "netfilter_links", lambda: [nflink.LinkInfo(i, 40 + i, 2, 0, -99, "p")
                                                            for i in (3137, 3138, 3139, 4000)])
    assert nflink.who_holds(2, 0, -99, 444, proc=proc) == \
        "BPF program id 4040 (p) (held by no process visible here) is attached at priority -99"


def test_a_priority_without_a_visible_holder(tmp_path, monkeypatch):
    proc = fake_proc(tmp_path, {})
    monkeypatch.setattr(nflink, "netfilter_links", lambda: [nflink.LinkInfo(9, 41, 2, 0, -99, "nf_prerouting_p")])
    assert nflink.who_holds(2, 0, -99, proc=proc) == \
        "BPF program id 41 (nf_prerouting_p) (held by no process visible here) is attached at priority -99"
    monkeypatch.setattr(nflink, "netfilter_links", lambda: [])
    assert "not BPF (an nftables chain or a kernel module) uses priority -99" in nflink.who_holds(2, 0, -99, proc=proc)

    def no_cap():
        raise nflink.LinkError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(nflink, "netfilter_links", no_cap)
    assert "needs CAP_SYS_ADMIN" in nflink.who_holds(2, 0, -99, proc=proc)


class FakeKernel:
    """link_create with priorities already taken on some (pf, hook)."""

    def __init__(self, taken, refuse=None):
        self.taken, self.refuse, self.open = set(taken), refuse, []

    def create(self, prog_fd, pf, hook, priority):
        if self.refuse:
            raise nflink.LinkError(self.refuse, os.strerror(self.refuse))
        if (pf, hook, priority) in self.taken:
            raise nflink.LinkError(errno.EBUSY, os.strerror(errno.EBUSY))
        self.taken.add((pf, hook, priority))
        link = nflink.NetfilterLink(-1, pf, hook, priority)
        self.open.append(link)
        kernel = self

        def close():
            kernel.taken.discard((pf, hook, priority))
            kernel.open.remove(link)
        link.close = close
        return link


POINTS = [(3, pf, hook) for hook in (0, 3) for pf in (2, 10)]


def test_the_next_free_priority_after_the_taken_one(monkeypatch):
    k = FakeKernel({(10, 3, -99), (2, 0, -98)})       # another tracer's, a hook of one family only
    monkeypatch.setattr(nflink, "link_create", k.create)
    links, prio, busy = nflink.link_at_free_priority(POINTS)
    assert prio == -97 and busy == [(10, 3, -99), (2, 0, -98)]
    assert sorted((lk.pf, lk.hook) for lk in links) == sorted((pf, hook) for _, pf, hook in POINTS)
    assert all(lk.priority == -97 for lk in k.open) and len(k.open) == 4   # nothing left at -99, -98


def test_a_full_range_and_other_errors(monkeypatch):
    k = FakeKernel({(2, 0, p) for p in range(nflink.PRIORITY_FIRST, nflink.PRIORITY_LAST + 1)})
    monkeypatch.setattr(nflink, "link_create", k.create)
    with pytest.raises(nflink.LinkError) as e:
        nflink.link_at_free_priority(POINTS)
    assert e.value.errno == errno.EBUSY and k.open == []
    monkeypatch.setattr(nflink, "link_create", FakeKernel((), refuse=errno.EINVAL).create)
    with pytest.raises(nflink.LinkError) as e:
        nflink.link_at_free_priority(POINTS)
    assert e.value.errno == errno.EINVAL


def test_the_probe_explains_a_busy_range_as_other_tracers_not_an_old_kernel(monkeypatch):
    from bpftrace_hostport.collect.netfilter import probe
    from bpftrace_hostport.errors import KernelFeatureMissing, UserError
    k = FakeKernel({(2, 0, p) for p in range(-99, 0)})
    monkeypatch.setattr(nflink, "link_create", k.create)
    monkeypatch.setattr(nflink, "who_holds", lambda pf, hook, prio, netns:
                        f"bpftrace-hostport pid 1 (agent) is attached at priority {prio}")
    with pytest.raises(UserError) as e:
        probe.link_all(probe.attach_points(3))
    assert not isinstance(e.value, KernelFeatureMissing)
    assert str(e.value) == ("Every netfilter priority from -99 to -1 at PRE_ROUTING is taken (bpftrace-hostport "
                            "pid 1 (agent) is attached at priority -99); stop one of the tracers there.")
    k = FakeKernel({(2, 0, -99)})
    monkeypatch.setattr(nflink, "link_create", k.create)
    links, prio, why = probe.link_all(probe.attach_points(3))
    assert prio == -98 and why == "bpftrace-hostport pid 1 (agent) is attached at priority -99" and len(links) == 4
    monkeypatch.setattr(nflink, "link_create", FakeKernel((), refuse=errno.EINVAL).create)
    with pytest.raises(KernelFeatureMissing, match=r"needs Linux >= 6\.4"):
        probe.link_all(probe.attach_points(3))
