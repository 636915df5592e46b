"""Sinks: where a session's records go. One small interface; a new output is a new sink.

Every sink gets, in order: start(header) once; announce(banner) once attached; flows(batch)
and misses(records) as they come; tick(summary) about once a second with the running summary;
close(summary) once. With --anonymize the session has replaced the client addresses before any
sink sees them (collect/session.py), so every output holds the same pseudonyms.
"""
from __future__ import annotations

import sys
from collections import deque
from typing import List, Optional, TextIO

import orjson

from bpftrace_hostport.addr import endpoint
from bpftrace_hostport.records.batch import AddrNames, FlowBatch


class Sink:
    """The interface. A subclass declares `needs`: "records" (the kernel sends a record per
    flow) or "counters" (its figures come from the kernel's per-mapping counters and the
    running summary; only flows nobody answered still come as records). collect/outputs.py
    refuses a sink that declares neither."""
    tick_latency = True       # tick() is given latency percentiles (False: a cheaper summary)
    shows_banner = False      # announce() shows the start banner (else the session prints it)

    def start(self, header: dict) -> None:
        pass

    def announce(self, text: str) -> None:
        """The start banner ("Tracing hostPort DNAT in ...; Ctrl-C to end."), once attached."""

    def flows(self, batch: FlowBatch) -> None:
        pass

    def misses(self, recs: List[dict]) -> None:
        pass

    def snapshot(self, kind: str, items: List[dict]) -> None:
        pass

    def tick(self, summary: dict) -> None:
        pass

    def kernel_counters(self, counters: dict) -> None:
        """The backend's raw counters, before each tick (netfilter: per-mapping answered flows
        and latency histograms counted in the kernel)."""

    def close(self, summary: dict) -> None:
        pass


def _dump(rec: dict) -> bytes:
    return orjson.dumps(rec) + b"\n"


class JsonLinesSink(Sink):
    """`--format json`: the capture header, one object per flow and miss, the summary last."""
    needs = "records"

    def __init__(self, out: TextIO):
        self.out = out
        self.binary = getattr(out, "buffer", None)
        self.addr = AddrNames()

    def _write(self, data: bytes) -> None:
        if not data:
            return
        if self.binary is not None:
            self.binary.write(data)
            self.binary.flush()          # each batch: a capture killed with -9 keeps it
        else:
            self.out.write(data.decode())
            self.out.flush()

    def start(self, header: dict) -> None:
        self._write(_dump(header))

    def flows(self, batch: FlowBatch) -> None:
        self._write(b"".join(_dump(r) for r in batch.to_records(self.addr)))

    def misses(self, recs: List[dict]) -> None:
        self._write(b"".join(_dump(r) for r in recs))

    def close(self, summary: dict) -> None:
        self._write(_dump(summary))


def host_port(ip: Optional[str], port) -> str:
    """ip:port, with IPv6 in brackets so the port can be told from the address (addr.endpoint)."""
    return endpoint(ip, port)


def outcome_text(r: dict) -> str:
    """What came back for a flow record: "0.07 ms", "REFUSED reset by pod 0.05 ms", "UNANSWERED"."""
    outcome = r.get("outcome") or ("answered" if r.get("answered") else "unanswered")
    if outcome == "answered":
        return f"{r['latency_us'] / 1000:.2f} ms" if r.get("latency_us") is not None else "answered"
    if outcome == "refused":
        by = f" by {r['refused_by']}" if r.get("refused_by") else ""
        after = f" {r['refusal_us'] / 1000:.2f} ms" if r.get("refusal_us") is not None else ""
        return f"REFUSED {r.get('refusal') or ''}{by}{after}".replace("  ", " ")
    return "PENDING" if outcome == "pending" else "UNANSWERED"


def flow_line(r: dict) -> str:
    """One flow record as a line of text (the text sink and the live view); the time is UTC."""
    pod = f"{r['pod_namespace']}/{r['pod_name']}" if r["pod_name"] else "pod?"
    extra = []
    if r["masqueraded"]:
        extra.append(f"masq {r['snat_ip']}")
    if r["drop_reason"]:
        extra.append(f"drop {r['drop_reason']}")
    return (f"{r['ts'][11:23]} {r['proto']} {endpoint(r['client_ip'], r['client_port'])} -> "
            f"{endpoint(r['node_ip'], r['host_port'])} => {endpoint(r['pod_ip'], r['pod_port'])} "
            f"{pod}{' (' + r['port_name'] + ')' if r['port_name'] else ''} [{r['hook']}] {outcome_text(r)}"
            f"{', ' + ', '.join(extra) if extra else ''}")


def miss_line(r: dict) -> str:
    """A miss record as a line of text: connections to a watched hostPort that got no DNAT."""
    n = int(r["count"])
    owner = (f", hostNetwork pod {r['pod_namespace']}/{r['pod_name']}" if r.get("pod_name")
             else ", no rule or pod known")
    return (f"{r['ts'][11:23]} MISS {r['proto']} {r['client_ip']} -> "
            f"{endpoint(r['node_ip'], r['host_port'])}: {n} connection{'' if n == 1 else 's'} "
            f"not DNATed{owner}")


_TEXT_HEADER = ("# trace: a line per flow (time UTC, client -> node:hostPort => pod:containerPort, pod, "
                "[hook], first-reply latency or what came back) and per miss (not DNATed); the summary "
                "at the end\n")


class TextSink(Sink):
    """`--format table` on a pipe: a line per flow and miss, the summary table at the end.

    `check_hint`: the `check` command line the summary suggests when something looks wrong;
    `pods`: the node's pods (PodInfo, or a callable returning them) for the summary's notes.
    """
    needs = "records"

    def __init__(self, out: TextIO, check_hint: Optional[str] = None, pods=None):
        self.out = out
        self.addr = AddrNames()
        self.check_hint, self.pods = check_hint, pods
        self.measures: dict = {}

    def start(self, header: dict) -> None:
        self.measures = header.get("measures") or {}
        self.out.write(_TEXT_HEADER)
        self.out.flush()

    def flows(self, batch: FlowBatch) -> None:
        for r in batch.to_records(self.addr):
            self.out.write(flow_line(r) + "\n")
        self.out.flush()

    def misses(self, recs: List[dict]) -> None:
        for r in recs:
            self.out.write(miss_line(r) + "\n")
        self.out.flush()

    def close(self, summary: dict) -> None:
        from bpftrace_hostport.analysis.render import render_summary
        self.out.write("\n" + render_summary(summary, width=_width(self.out), check_hint=self.check_hint,
                                             pods=self.pods, measures=self.measures))
        self.out.flush()


def _width(out: TextIO) -> Optional[int]:
    """The width tables fit on `out`: $COLUMNS, else the terminal's; None (no limit) on a pipe."""
    from bpftrace_hostport.analysis.render import terminal_width
    return terminal_width(out)


class _Keys:
    """Keys read from the terminal while the live view runs, one at a time (cbreak mode: no
    echo, no line buffering; Ctrl-C still sends SIGINT). Only when standard input is the
    terminal and this process is in its foreground (a background job changing the terminal's
    mode would be stopped by SIGTTOU). The mode is restored when it stops, and at exit."""

    def __init__(self, stream, on_key):
        import atexit
        import termios
        import threading
        import tty
        self.fd = stream.fileno()
        self.termios = termios
        self.saved = termios.tcgetattr(self.fd)
        tty.setcbreak(self.fd, termios.TCSANOW)
        atexit.register(self.stop)
        self.on_key = on_key
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="live-keys", daemon=True)
        self.thread.start()

    @classmethod
    def start(cls, stream, on_key) -> Optional["_Keys"]:
        import os
        try:
            if not stream.isatty() or os.tcgetpgrp(stream.fileno()) != os.getpgrp():
                return None
            return cls(stream, on_key)
        except (OSError, ValueError, AttributeError, ImportError):
            return None

    def _run(self) -> None:
        import os
        import select
        while not self.done.is_set():
            try:
                ready, _, _ = select.select([self.fd], [], [], 0.2)
                if ready:
                    key = os.read(self.fd, 8)
                    if not key:
                        return
                    self.on_key(key)
            except (OSError, ValueError):
                return

    def stop(self) -> None:
        if self.saved is None:
            return
        self.done.set()
        try:
            self.termios.tcsetattr(self.fd, self.termios.TCSADRAIN, self.saved)
        except (OSError, ValueError):
            pass
        self.saved = None


NEXT_KEYS = (b"n", b" ", b"j", b"\x1b[C", b"\x1b[B", b"\x1b[6~")       # n, space, j, right, down, page down
PREV_KEYS = (b"p", b"b", b"k", b"\x1b[D", b"\x1b[A", b"\x1b[5~")       # p, b, k, left, up, page up


class LiveSink(Sink):
    """`--format table` on a terminal: a frame that fits the terminal, redrawn once a second.

    Above it the banner (announce), wrapped to the width; the frame: the headline with the
    current rate, what looks wrong (a line per finding: which mapping, what: refused,
    unanswered, drops by reason, misses with their owner; expected states as expected), the
    check command, per mapping the flows by outcome, the rate of the last few seconds, latency,
    misses and drops, then the latest flows and misses. When the mappings do not all fit,
    they are shown a page at a time: n (or space, j, a right or down arrow) turns to the next
    page, p (b, k, left, up) back; the key is read from the terminal, since a page that turns by
    itself moves away what the on-call engineer is reading (without a terminal to read from,
    the pages turn every PAGE_TURN_S seconds). After Ctrl-C the frame goes, and the latest
    events and then the full summary are printed and stay: the summary is the last thing on
    the screen.
    """
    needs = "records"
    shows_banner = True

    RATE_WINDOW_S = 5.0
    PAGE_TURN_S = 5.0

    def __init__(self, out: TextIO, check_hint: Optional[str] = None, pods=None, keys_from=None):
        import threading
        self.out = out
        self.recent_flows: deque = deque(maxlen=40)
        self.recent_misses: deque = deque(maxlen=8)
        self.samples: deque = deque()
        self.addr = AddrNames()
        self.live = None
        self.console = None
        self.check_hint, self.pods = check_hint, pods
        self.keys_from = sys.stdin if keys_from is None else keys_from
        self.keys: Optional[_Keys] = None
        self.banner: List[str] = []
        self.measures: dict = {}
        self.page = 0
        self.pages = 1
        self.turned = 0.0
        self._last: Optional[dict] = None
        self._current: Optional[dict] = None
        self._lock = threading.Lock()

    def start(self, header: dict) -> None:
        import time
        from rich.console import Console
        from rich.live import Live
        from rich.text import Text
        self.measures = header.get("measures") or {}
        self.console = Console(file=self.out)
        self.live = Live(Text("waiting for hostPort traffic..."), console=self.console,
                         auto_refresh=False, transient=True, vertical_overflow="crop",
                         redirect_stdout=False)
        self.live.start()
        self.turned = time.monotonic()
        self.keys = _Keys.start(self.keys_from, self._key)

    def announce(self, text: str) -> None:
        """The banner, wrapped to the width, above the frame (which then leaves room for it)."""
        from rich.text import Text
        from bpftrace_hostport.analysis.render import paragraph
        if self.console is None:
            return
        self.banner = paragraph(text, self.size()[0])
        with self._lock:
            self.console.print(Text("\n".join(self.banner), no_wrap=True, overflow="ignore"))

    def flows(self, batch: FlowBatch) -> None:
        tail = batch.select(slice(max(0, len(batch) - self.recent_flows.maxlen), None))
        self.recent_flows.extend((r["ts"], flow_line(r)) for r in tail.to_records(self.addr))

    def misses(self, recs: List[dict]) -> None:
        self.recent_misses.extend((r["ts"], miss_line(r)) for r in recs[-self.recent_misses.maxlen:])

    def events(self, n: int) -> List[str]:
        """The latest `n` events in time order: up to 2 latest misses, the rest the latest flows."""
        misses = list(self.recent_misses)[-2:]
        flows = list(self.recent_flows)[-max(n - len(misses), 0):] if n > len(misses) else []
        return [text for _, text in sorted(flows + misses, key=lambda e: e[0])][-n:]

    def current(self, summary: dict, now: Optional[float] = None) -> Optional[dict]:
        """Flows per second per mapping over the last RATE_WINDOW_S seconds (None: too early)."""
        import time
        from bpftrace_hostport.analysis.render import mapping_key
        now = time.monotonic() if now is None else now
        counts = {mapping_key(m): int(m.get("flows") or 0) for m in summary.get("mappings") or []}
        self.samples.append((now, counts))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.RATE_WINDOW_S:
            self.samples.popleft()
        then, old = self.samples[0]
        if now - then < 0.5:
            return None
        return {k: max(v - old.get(k, 0), 0) / (now - then) for k, v in counts.items()}

    def _key(self, key: bytes) -> None:
        """A key from the terminal: turn the page and redraw at once."""
        step = 1 if key in NEXT_KEYS else -1 if key in PREV_KEYS else 0
        if step and self.pages > 1:
            with self._lock:
                self.page = (self.page + step) % self.pages
            self._draw()

    def tick(self, summary: dict) -> None:
        import time
        if self.live is None:
            return
        self._current = self.current(summary)
        self._last = summary
        now = time.monotonic()
        if self.keys is None and self.pages > 1 and now - self.turned >= self.PAGE_TURN_S:
            self.page, self.turned = (self.page + 1) % self.pages, now
        self._draw()

    def size(self):
        """(columns, rows) of the terminal now: asked of the terminal itself, so that a resize
        shows at the next frame and an exported LINES or COLUMNS (which rich would believe)
        cannot make a frame taller than the screen."""
        import os
        try:
            return tuple(os.get_terminal_size(self.out.fileno()))
        except (OSError, ValueError, AttributeError):
            return self.console.width, self.console.height

    def _draw(self) -> None:
        from rich.text import Text
        from bpftrace_hostport.analysis.render import render_live
        with self._lock:
            if self.live is None or self._last is None:
                return
            width, height = self.size()
            frame = render_live(self._last, width, height - len(self.banner),
                                self.events(12), current=self._current, check_hint=self.check_hint,
                                pods=self.pods, page=self.page, measures=self.measures,
                                keys=self.keys is not None)
            self.page, self.pages = frame.page, frame.pages
            self.live.update(Text(frame.text, no_wrap=True, overflow="crop"), refresh=True)

    def close(self, summary: dict) -> None:
        from bpftrace_hostport.analysis.render import render_summary, wrap
        if self.keys is not None:
            self.keys.stop()
        with self._lock:
            if self.live is not None:
                self.live.stop()
                self.live = None
        width = self.size()[0] if self.console is not None else _width(self.out)
        events = self.events(8)
        if events:
            self.out.write("latest events (times UTC):\n"
                           + "\n".join(ln for ev in events for ln in wrap(ev, width, "    ")) + "\n\n")
        self.out.write(render_summary(summary, width=width, check_hint=self.check_hint, pods=self.pods,
                                      measures=self.measures))
        self.out.flush()


def output_sink(fmt: str, out: TextIO = sys.stdout, check_hint: Optional[str] = None,
                pods=None) -> Sink:
    """The sink for --format: json lines, or a table (live on a terminal, text on a pipe)."""
    if fmt == "json":
        return JsonLinesSink(out)
    table = LiveSink if out.isatty() else TextSink
    return table(out, check_hint=check_hint, pods=pods)


class EndLineSink(Sink):
    """`--format none`: one line on stderr at the end: flows, lost flows, where the recording
    is (its files and size), or where the metrics were served."""
    needs = "counters"

    def __init__(self, recording: Optional["RecordingSink"] = None, metrics: Optional[str] = None,
                 err: Optional[TextIO] = None):
        self.recording, self.metrics, self._err = recording, metrics, err

    def close(self, summary: dict) -> None:
        import os
        from bpftrace_hostport.analysis.render import human_bytes, plural
        lost = summary.get("lost_events")
        parts = [plural(int(summary.get("flows") or 0), "flow") + ", "
                 + ("lost flows unknown" if lost is None else plural(int(lost), "lost flow"))]
        w = getattr(self.recording, "writer", None)
        if w is not None:
            paths = [p for p in w.paths if os.path.exists(p)]
            size = sum(os.path.getsize(p) for p in paths)
            where = paths[0] if len(paths) == 1 else (
                f"{len(paths)} files in {w.directory}" if w.directory else f"{len(paths)} files, {', '.join(paths)}")
            parts.append(f"recording: {where} ({human_bytes(size)})")
        elif self.recording is not None:
            parts.append("no recording was written")
        elif self.metrics:
            parts.append(f"metrics were served on {self.metrics}")
        print("; ".join(parts) + ".", file=self._err or sys.stderr, flush=True)


class RecordingSink(Sink):
    """`--record PATH`: everything the session sees, in a crash-safe Arrow IPC stream."""
    needs = "records"

    def __init__(self, path: str, max_size: Optional[int] = None, max_files: Optional[int] = None,
                 anonymize_key: Optional[bytes] = None):
        self.path, self.max_size, self.max_files, self.key = path, max_size, max_files, anonymize_key
        self.writer = None

    def start(self, header: dict) -> None:
        from bpftrace_hostport.records.recording import RecordingWriter
        self.writer = RecordingWriter(self.path, header, max_size=self.max_size,
                                      max_files=self.max_files, anonymize_key=self.key)

    def flows(self, batch: FlowBatch) -> None:
        self.writer.write_flows(batch)

    def misses(self, recs: List[dict]) -> None:
        self.writer.write_misses(recs)

    def snapshot(self, kind: str, items: List[dict]) -> None:
        self.writer.write_snapshot(kind, items)

    def close(self, summary: dict) -> None:
        if self.writer is not None:
            self.writer.write_summary(summary)
            self.writer.close()
