"""Reading a user's file: one place for the friendly errors (one sentence with the fix)."""
from __future__ import annotations

from bpftrace_hostport.errors import UserError


def read_text(path: str, expect: str, encoding: str = "utf-8") -> str:
    """The text of `path`; `expect` says what the user should give (e.g. "a YAML or JSON file")."""
    try:
        with open(path, encoding=encoding) as f:
            return f.read()
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; check the path and try again.") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory; pass {expect} instead.") from None
    except PermissionError:
        raise UserError(f"{path} cannot be read (permission denied); fix its permissions or run as "
                        "a user who can read it.") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; pass {expect} instead.") from None
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror or e}); check the path and try again.") from None


def private_file(path: str, binary: bool = True):
    """A new file for writing, 0600 whatever the umask (and an existing one made 0600): every
    file that holds client addresses (a recording, an export, a report) is created this way.
    A path that cannot be written is a UserError with the fix."""
    import os
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except IsADirectoryError:
        raise UserError(f"{path} is a directory; give a file name with -o.") from None
    except OSError as e:
        raise UserError(f"Cannot write {path} ({e.strerror or e}); choose another path with -o.") from None
    try:
        os.fchmod(fd, 0o600)
        return open(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"}))
    except BaseException:
        os.close(fd)
        raise
