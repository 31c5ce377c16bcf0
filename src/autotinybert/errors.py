"""The one exception type the command line turns into a one-line message.

Raise `UserError` for anything the *user* can fix (a bad argument, a missing or corrupt
file, an infeasible constraint). The message must name the problem and the fix. Everything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
from typing import Iterator


class UserError(ValueError):
    """A problem with the user's input, explained in one line."""


class Preempted(UserError):
    """Training stopped on SIGTERM at a step boundary after saving a checkpoint.

    The message is the whole one-line report (no "error:" wording belongs in front of it);
    `exit_code` is what the process should exit with (128 + SIGTERM, as a killed process would).
    """

    exit_code = 143
    command: str = ""   # the training command that stopped (pretrain / finetune)
    step: int = 0       # the step its checkpoint holds


class Terminated(BaseException):
    """SIGTERM outside a training loop's own handling (`training.StopOnSigterm`): while data is
    prepared, a model loads, results are written. Raised by the command line's handler (`cli.main`).

    A `BaseException`, like `KeyboardInterrupt`, so that no ``except Exception`` on the way turns
    it into some other error; the writes it interrupts are staged or atomic, so a rerun with
    ``--resume`` continues (or, before the first checkpoint, starts again). Exit code 143.
    """

    exit_code = 143


class SetupWarning(UserWarning):
    """Something about the user's setup that may make results wrong but does not stop the run
    (e.g. a latency predictor measured on another machine). The command line prints it as one
    line, ``autotinybert <command>: warning: ...``."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (parsers write several), or its type's name."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def bad_file_errors() -> tuple[type[BaseException], ...]:
    """What the libraries we read files with raise on a missing, unreadable or corrupt file."""
    import pickle

    found: list[type[BaseException]] = [OSError, ValueError, EOFError, KeyError, TypeError, pickle.UnpicklingError]
    for module, name in (("yaml", "YAMLError"), ("safetensors", "SafetensorError")):
        try:
            found.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


@contextlib.contextmanager
def reading(path: object, what: str = "", fix: str = "", also: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Turn what a parser raises on a bad file into one `UserError` naming the file and the fix.

    ``what`` names the option the file came from (``--model``); ``also`` adds exception types a
    particular reader raises on bad bytes (torch's RuntimeError on a torn archive).
    """
    try:
        yield
    except UserError:
        raise
    except (*bad_file_errors(), *also) as err:
        problem = "is not UTF-8 text" if isinstance(err, UnicodeDecodeError) else f"cannot be read ({first_line(err)})"
        prefix = f"{what} " if what else ""
        raise UserError(f"{prefix}{path} {problem}" + (f"; {fix}" if fix else "")) from None
