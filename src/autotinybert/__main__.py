"""`python -m autotinybert` (and `torchrun -m autotinybert`) run the command line."""

import os
import signal
import sys


def _stopped_while_starting(signum, frame) -> None:
    # Until `cli.main` installs its own handler (importing takes a tenth of a second): one line, 143.
    sys.stderr.write("autotinybert: stopped by SIGTERM while starting; nothing was written; rerun the same command "
                     "(--resume, where the command has it, starts it afresh)\n")
    os._exit(143)


signal.signal(signal.SIGTERM, _stopped_while_starting)

from .cli import main  # noqa: E402  (after the handler: the import is the slow part)

sys.exit(main())
