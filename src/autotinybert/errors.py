"""The one exception type the command line turns into a one-line message.

Raise `UserError` for anything the *user* can fix (a bad argument, a missing or corrupt
file, an infeasible constraint). The message must name the problem and the fix. Everything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem with the user's input, explained in one line."""
