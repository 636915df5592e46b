"""The one exception type that reaches the CLI boundary as a plain sentence."""


class UserError(Exception):
    """A problem the user can fix. str(err) is one plain sentence that says how.

    The CLI turns it into `Error: <sentence>` on stderr and exit code 2, never a traceback.
    """
