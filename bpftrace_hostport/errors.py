"""The one exception type that reaches the CLI boundary as a plain sentence."""


class UserError(Exception):
    """A problem the user can fix. str(err) is one plain sentence that says how.

    The CLI turns it into `Error: <sentence>` on stderr and exit code 2, never a traceback.
    """


class KernelFeatureMissing(UserError):
    """The kernel lacks what the eBPF tracer needs (netfilter BPF link, program type).

    `trace --backend auto` answers it by falling back to conntrack events after one warning.
    """
    fallback = True
