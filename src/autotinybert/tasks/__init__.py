"""Downstream tasks: GLUE and SQuAD loading, metrics, fine-tuning and evaluation.

    from autotinybert.tasks import FinetuneSettings, finetune_model, build_task_model, resolve_task
    task = resolve_task("sst2")
    data = load_task_data(task, "glue_data", settings=settings)
    scores = finetune_model(build_task_model(encoder, task), tokenizer, task, data, settings).scores

Metrics and loaders import without torch; fine-tuning loads torch on first use.
"""

from __future__ import annotations

_LAZY = {
    "FinetuneSettings": "finetune", "FinetuneResult": "finetune", "TaskData": "finetune",
    "finetune_model": "finetune", "evaluate_model": "finetune", "build_task_model": "finetune",
    "load_task_model": "finetune", "load_task_data": "finetune", "resolve_task": "finetune",
    "RunStore": "finetune", "run_finetune": "run", "run_evaluate": "run", "results_table": "run",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'autotinybert.tasks' has no attribute {name!r}")
