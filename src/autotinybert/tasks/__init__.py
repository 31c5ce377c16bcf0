"""Downstream tasks: GLUE and SQuAD loading, metrics, fine-tuning and evaluation.

    from autotinybert.tasks import FinetuneSettings, finetune_encoder, load_task_data, resolve_task
    task, settings = resolve_task("sst2"), FinetuneSettings(epochs=1, max_train_examples=2000)
    data = load_task_data(task, "glue_data", settings=settings)      # once; reused per candidate
    result = finetune_encoder(encoder, tokenizer, task, data, settings)  # in memory, no files
    result.score, result.scores                                        # 91.2, {"dev": {"accuracy": 91.2}}

Metrics and loaders import without torch; fine-tuning loads torch on first use.
"""

from __future__ import annotations

_LAZY = {
    "FinetuneSettings": "finetune", "FinetuneResult": "finetune", "TaskData": "finetune",
    "finetune_model": "finetune", "finetune_encoder": "finetune", "evaluate_model": "finetune", "build_task_model": "finetune",
    "load_task_model": "finetune", "load_task_data": "finetune", "resolve_task": "finetune",
    "RunStore": "finetune", "run_finetune": "run", "run_evaluate": "run", "results_table": "run",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'autotinybert.tasks' has no attribute {name!r}")
