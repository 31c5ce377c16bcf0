"""`autotinybert demo`: the whole pipeline (`develop`) on the shipped ``demo`` config.

No data files are needed: the corpus is the docstrings of the running Python's standard library
and the labelled task is the VADER sentiment lexicon of the ``vaderSentiment`` dependency (see
`builtin_data`). A small space, a few hundred pre-training steps, two latency targets, the fast
search, short further training and fine-tuning: about 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

from pathlib import Path

from .develop import develop, load_config, remove_run


def run_demo(out_dir: str | Path, overrides: list[str] | None = None, overwrite: bool = False) -> dict:
    """Run (or continue) the demo in ``out_dir``; returns the run's manifest."""
    config = load_config("demo", overrides)
    out_dir = Path(out_dir)
    if overwrite:
        remove_run(out_dir)
    return develop(config, out_dir)
