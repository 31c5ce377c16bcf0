"""The one exception type the command line turns into a one-line message.

Raise `UserError` for anything the *user* can fix (a bad argument, a missing or corrupt
file, an infeasible constraint). The message must name the problem and the fix. Everything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


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
