"""
The error boundary of every examples/*.py script: a user's mistake is one line, a bug is a traceback.

    from nanogpt_hf.cli import error_boundary

    @error_boundary
    def main(argv=None):
        ...

What counts as the user's (bad flags, files, folders, refused pickles, damaged safetensors, missing devices, the
network) ends the process with `error: <one line>` (exit 1, as before: SystemExit with the message); a stop signal
after its checkpoint exits 128 + the signal. `--debug` (anywhere in argv, removed before main sees it) or
NANOGPT_DEBUG=1 lets the exception through with its traceback. Anything else (TypeError, KeyError, ... in our
code) was never the user's fault and keeps its traceback. A write the disk refused (disk_error: full, quota,
read-only, I/O error, file too large) is the user's too; `naming(path)` puts the file's path into it (a failed
write() carries none). This module imports nothing heavy: train.py --help stays torch-free.
"""

import contextlib
import errno
import functools
import os
import pickle
import sys

DEBUG_ENV = "NANOGPT_DEBUG"


class Interrupted(Exception):
    """A stop signal ended the run after a checkpoint; exit_code is 128 + the signal's number (guards.py raises it;
    it lives here so that the boundary knows it without importing torch)."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code


def user_errors():
    """The exception types that mean bad input, not a bug: ours are ValueErrors; files and the network are
    OSErrors (TimeoutError, ConnectionError, FileNotFoundError...); the rest come from the libraries we read with."""
    errors = [ValueError, OSError, FloatingPointError, pickle.UnpicklingError, EOFError, UnicodeDecodeError]
    for module, name in (("safetensors", "SafetensorError"), ("nanogpt_hf.hub", "HubError"),
                         ("requests", "RequestException"), ("httpx", "HTTPError"), ("yaml", "YAMLError")):
        mod = sys.modules.get(module)  # only what is already imported can have raised
        if mod is not None and hasattr(mod, name):
            errors.append(getattr(mod, name))
    return tuple(errors)


def one_line(e):
    """An exception as one line: its message's first non-empty line (with its type, for a library's own
    exception types, whose messages rarely say what they are)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = lines[0] if lines else type(e).__name__
    if not isinstance(e, (ValueError, OSError, FloatingPointError)) or not lines:
        text = f"{type(e).__name__}: {text}" if lines else text
    if isinstance(e, OSError) and e.filename and str(e.filename) not in text:  # name the path
        text = f"{e.filename}: {text}"
    return text


DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG)  # a write the disk refused


def disk_error(e):
    """The OSError of a refused write behind e (datasets wraps its own in DatasetGenerationError; pyarrow's carry
    the errno only in their message), or None."""
    while e is not None:
        if isinstance(e, OSError) and (e.errno in DISK_ERRORS or e.errno is None and
                                       any(f"[Errno {n}]" in str(e) for n in DISK_ERRORS)):
            return e
        e = e.__cause__ or e.__context__
    return None


@contextlib.contextmanager
def naming(path):
    """A write that fails names its file: an OSError of write(), flush() or fsync() carries no path. path: the
    file, or a callable giving it (None: nothing to name)."""
    try:
        yield
    except OSError as e:
        path = path() if callable(path) else path
        if e.filename is None and path is not None:
            e.filename = str(path)
        raise


def error_boundary(main):
    """Wrap a script's main(argv=None) (see the module docstring)."""

    @functools.wraps(main)
    def wrapper(argv=None):
        argv = list(sys.argv[1:] if argv is None else argv)
        debug = os.environ.get(DEBUG_ENV, "") not in ("", "0") or "--debug" in argv
        argv = [a for a in argv if a != "--debug"]
        try:
            return main(argv)
        except SystemExit:
            raise
        except Exception as e:
            if isinstance(e, Interrupted):
                if os.environ.get("RANK", "0") == "0":  # every rank stops; one line is enough
                    print(e, file=sys.stderr)
                sys.exit(e.exit_code)
            if debug or not isinstance(e, user_errors()):
                raise
            sys.exit(f"error: {one_line(e)}")

    return wrapper


__all__ = ["error_boundary", "Interrupted", "one_line", "user_errors", "disk_error", "naming", "DISK_ERRORS",
           "DEBUG_ENV"]
