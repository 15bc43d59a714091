"""One error model for every rnnlab command: user errors, exit codes, and the one ``error: ...`` line.

Every error that the user can fix (a bad flag, a missing or corrupt file, an unknown corpus, a refused
resume) derives from ``UserError`` and carries a one-line message naming what is wrong. Commands do not
catch them one by one: ``run_command`` turns them into one ``error: ...`` line on stderr and an exit code
from the table below, the same for ``rnnlab-lm``, ``rnnlab-mt``, ``rnnlab-serve`` and ``rnnlab-client``.

| code | meaning |
|------|---------|
| 0    | success |
| 1    | some inputs failed (a batch job's sentences, a refused RPC); the rest was done |
| 2    | usage or user error: bad flags or config, a missing, corrupt or foreign file; torch missing |
| 3    | interrupted (Ctrl-C, SIGTERM); a training run or batch job resumes with ``--resume`` |
| 70   | internal error (a bug): the message names the exception; ``RNNLAB_DEBUG=1`` shows the traceback |

The gRPC services map exception types to status codes in one table too (``serving.status``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from enum import IntEnum

TRAINING_ONLY = ("torch", "onnx", "onnxscript", "matplotlib", "tensorboard")
"""Packages of the ``train`` extra that the serving install (``pip install 'rnnlab[serve]'``) lacks: a
command that reads a run directory (a checkpoint) imports them, a command on a bundle does not."""


class ExitCode(IntEnum):
    OK = 0
    SOME_FAILED = 1
    USER_ERROR = 2
    INTERRUPTED = 3
    INTERNAL = 70  # EX_SOFTWARE of sysexits.h


class UserError(Exception):
    """An error the user can fix; ``str(error)`` is one line that names the file, flag or value."""


class UsageError(UserError):
    """A command line that asks for something impossible (flags that exclude each other, say)."""


class Interrupted(Exception):
    """A run stopped by Ctrl-C or SIGTERM after saving what lets it resume; the message says how."""


def fail(message: str, code: ExitCode) -> int:
    """Prints ``error: <first line of message>`` on stderr and returns ``code``."""
    print(f"error: {message}".splitlines()[0], file=sys.stderr)
    return int(code)


def run_command(command: Callable[[], int]) -> int:
    """Runs one CLI command and maps what it raises to the exit-code table (argparse exits pass through)."""
    try:
        return command()
    except UserError as exc:
        return fail(str(exc), ExitCode.USER_ERROR)
    except Interrupted as exc:
        return fail(str(exc) or "interrupted", ExitCode.INTERRUPTED)
    except KeyboardInterrupt:
        return fail("interrupted", ExitCode.INTERRUPTED)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] in TRAINING_ONLY:
            return fail(
                f"{exc.name} is not installed: this command needs the training install "
                "(pip install 'rnnlab[train]'); exported bundles need the serving install only",
                ExitCode.USER_ERROR,
            )
        return _internal(exc)
    except OSError as exc:  # a file the user named cannot be read or written
        return fail(str(exc), ExitCode.USER_ERROR)
    except Exception as exc:
        return _internal(exc)


def _internal(exc: Exception) -> int:
    if os.environ.get("RNNLAB_DEBUG"):
        raise exc
    return fail(f"internal error ({type(exc).__name__}): {exc}", ExitCode.INTERNAL)


QUOTE_CHARS = 80  # a 1 MB model name echoed whole once overflowed gRPC's 8 KB status-metadata limit


def quote(value: object, limit: int = QUOTE_CHARS) -> str:
    """``repr`` of a client- or user-supplied value cut to ``limit`` characters, for error messages."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(str(value))} characters)"
