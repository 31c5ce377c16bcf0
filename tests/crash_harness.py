"""Run `autotinybert` commands in killable child processes that start in milliseconds.

`python -m autotinybert` spends ~6 s importing torch and transformers on a busy 2-core machine;
killing 20+ runs that way would take minutes. Children are therefore forked from a
`multiprocessing` fork server that imported everything once; each child runs `cli.main(argv)`
exactly as `python -m autotinybert` does (same argv, exit code = main's return value, stdout to
LOG, stderr to LOG.err) and is a real process, killed with real signals.
"""

from __future__ import annotations

import multiprocessing
import os
import sys

PRELOAD = ["crash_harness", "torch", "transformers", "autotinybert.cli", "autotinybert.pretrain",
           "autotinybert.tasks.finetune", "autotinybert.tasks.run", "autotinybert.export"]
_CONTEXT = None


def context():
    """The fork-server context (started on first use, with one torch thread per child)."""
    global _CONTEXT
    if _CONTEXT is None:
        os.environ["OMP_NUM_THREADS"] = "1"
        # The server is a fresh interpreter: it must find this module and the package under test.
        here = os.path.dirname(os.path.abspath(__file__))
        paths = [here, os.path.join(os.path.dirname(here), "src"), os.environ.get("PYTHONPATH", "")]
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(PRELOAD)
    return _CONTEXT


def _main(argv: list[str], log: str) -> None:
    for target, path in ((1, log), (2, f"{log}.err")):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), target)
    import torch

    torch.set_num_threads(1)
    from autotinybert.cli import main

    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def start(argv: list[str], log: str):
    """A started child process running ``autotinybert <argv>``."""
    process = context().Process(target=_main, args=([str(a) for a in argv], str(log)))
    process.start()
    return process
