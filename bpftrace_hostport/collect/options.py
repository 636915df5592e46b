"""What a tracing session is asked to do: the command line's options as one value.

Its own module, importing nothing heavy, so that the CLI can build it and have the kernel side
loaded (outputs.load_probe) before the session, pod sources and sinks are imported.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple


@dataclass
class TraceOptions:
    netns: Optional[str] = None
    duration: Optional[float] = None
    host_ports: Sequence[Tuple[str, int]] = ()     # explicit watch list (restricts)
    protos: Sequence[str] = ()
    client_cidrs: Sequence[str] = ()
    timeout: float = 5.0                           # no-answer timeout, seconds
    ready_file: Optional[str] = None
    flow_table_size: int = 65536
    ringbuf_pages: int = 512
    drops: bool = True
    flow_records: bool = True                      # False: answered flows are counted, not reported
    use_rules: bool = True
    debug_print_program: bool = False
    node_name: Optional[str] = None


class Stop:
    """Ctrl-C or SIGTERM was seen. One object from the first moment of a trace to its last
    (cli/trace.py sets the signal handlers to it before anything is loaded, the session keeps
    them until its sinks are closed), so that a signal while the programs load, the pods are
    read or the summary is written only asks the trace to end: it ends cleanly, with what was
    seen, and a recording gets its end row however many times Ctrl-C is pressed."""

    def __init__(self) -> None:
        self.flag = False
        self.signals = 0

    def __call__(self, *_) -> None:
        self.flag = True
        self.signals += 1
