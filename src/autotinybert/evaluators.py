"""Fitness functions for the search: the only part of it that touches models.

Both evaluators score an architecture with the weights it inherits from the SuperPLM (no
further pre-training):

``proxy``: scored on fixed masked held-out batches — validation MLM accuracy, −MLM loss, or
−KD loss against a teacher. Seconds per candidate.

``finetune``: the paper's fitness (§3.3: MNLI-m accuracy and SQuAD1.1 F1). The inherited
sub-model is fine-tuned in memory on each task within a step/example budget and scored on the
dev set; fitness is the mean main score (0–100). Minutes per candidate on a CPU.

`WorkerPool` runs either in several processes; each process builds its own evaluator and
every evaluation is a deterministic function of the architecture, so the search's result does
not depend on the number of workers.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import UserError
from .space import Arch

METRICS = ("mlm_accuracy", "mlm_loss", "kd_loss")


def file_digest(path: Path, limit: int = 1 << 30) -> str:
    """sha256 of a weights file: the evaluator key must change when the SuperPLM does."""
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            h.update(chunk)
            limit -= len(chunk)
            if limit <= 0:
                break
    return h.hexdigest()[:16]


def _seq_len_of(supernet: Path) -> int | None:
    """The sequence length the SuperPLM was pre-trained with, from its config.yaml if any."""
    config = supernet / "config.yaml"
    if not config.is_file():
        return None
    import yaml

    try:
        value = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("seq_len")
    except yaml.YAMLError:
        return None
    return int(value) if isinstance(value, int) else None


def _load_supernet(supernet: Path, device: str):
    """(SuperPLM on ``device``, its tokenizer, the torch device): what every evaluator starts from."""
    import torch

    from .checkpoint import load_supernet, load_tokenizer

    model = load_supernet(supernet)
    torch_device = torch.device(device)
    return model.to(torch_device), load_tokenizer(supernet), torch_device


class ProxyEvaluator:
    """Fitness = a validation metric of the inherited sub-model on fixed held-out batches."""

    def __init__(self, supernet: str | Path, valid_corpus: list[str], *, metric: str = "mlm_accuracy",
                 teacher: str | None = None, seq_len: int | None = None, batch_size: int = 32, batches: int = 8,
                 seed: int = 0, cache_dir: str | Path | None = None, device: str = "cpu",
                 trust_remote_code: bool = False) -> None:
        from .data import build_dataset
        from .pretrain.teachers import RecordedTeacher, Teacher
        from .pretrain.validation import validation_batches

        if metric not in METRICS:
            raise UserError(f"unknown proxy metric {metric!r}: use one of {', '.join(METRICS)}")
        if metric == "kd_loss" and not teacher:
            raise UserError("--metric kd_loss needs --teacher (the checkpoint the SuperPLM was distilled from)")
        if not valid_corpus:
            raise UserError("the proxy evaluator needs --valid-corpus (held-out text the SuperPLM did not train on)")
        if batch_size < 1 or batches < 1:
            raise UserError("--eval-batch-size and --eval-batches must be positive")
        supernet = Path(supernet)
        self.model, self.tokenizer, self.device = _load_supernet(supernet, device)
        self.space = self.model.config.search_space
        self.seq_len = seq_len or _seq_len_of(supernet) or 128
        cache = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "autotinybert" / "data"
        # The held-out text is both "corpus" and validation here: only the valid split is used.
        _, self.valid, _ = build_dataset(valid_corpus, self.tokenizer, self.seq_len, cache, valid_corpus)
        if len(self.valid) == 0:
            raise UserError(f"--valid-corpus {' '.join(valid_corpus)} holds no text")
        self.teacher = Teacher(teacher, self.device, trust_remote_code) if teacher else None
        if self.teacher is not None:
            self.teacher.check_fits(self.space, len(self.tokenizer))
        self.metric, self.batch_size, self.batches, self.seed = metric, batch_size, batches, seed
        # Every candidate is scored on these batches; the teacher's outputs on them are computed once.
        self.fixed = validation_batches(self.valid, self.tokenizer, batch_size, batches, seed, self.device)
        self.targets = RecordedTeacher(self.teacher, self.fixed) if self.teacher is not None else None
        self.key = (f"proxy:{metric}:supernet={file_digest(supernet / 'model.safetensors')}:seq={self.seq_len}"
                    f":bs={batch_size}:batches={batches}:seed={seed}:valid={len(self.valid)}"
                    + (f":teacher={self.teacher.path.resolve()}" if self.teacher else ""))
        self.seconds: list[float] = []

    def __call__(self, arch: Arch) -> float:
        from .pretrain.validation import validation_row

        self.space.check(arch)
        start = time.perf_counter()
        # kd_loss needs no MLM head: its forward pass (logits over the vocabulary) is skipped.
        row = validation_row(self.model, arch, self.fixed, self.targets, mlm=self.metric != "kd_loss")
        self.seconds.append(time.perf_counter() - start)
        # Higher is better for the search: losses are negated.
        return row["mlm_accuracy"] if self.metric == "mlm_accuracy" else -row[self.metric]


class FinetuneEvaluator:
    """Fitness = mean dev score of the inherited sub-model fine-tuned on `tasks` (in memory)."""

    def __init__(self, supernet: str | Path, tasks: list[str], data_dir: str | Path | None, *,
                 settings: Any = None, hub: bool = False, train_file: str | Path | None = None,
                 dev_file: str | Path | None = None, device: str = "cpu") -> None:
        from .tasks.finetune import FinetuneSettings, load_task_data, resolve_task
        from .tasks.run import data_source

        if not tasks:
            raise UserError("--evaluator finetune needs at least one --task (e.g. --task sst2)")
        # One bar for the whole search, not a bar and log lines per candidate.
        self.settings = replace(settings or FinetuneSettings(), progress=False, log_evaluations=False)
        self.settings.validate()
        source = data_source(Path(data_dir) if data_dir else None, hub, files_given=bool(train_file and dev_file))
        self.tasks = [resolve_task(name) for name in tasks]
        self.data = [_selection_data(task, load_task_data(task, source, test=False, train_file=train_file,
                                                          dev_file=dev_file, settings=self.settings))
                     for task in self.tasks]
        supernet = Path(supernet)
        self.model, self.tokenizer, self.device = _load_supernet(supernet, device)
        self.space = self.model.config.search_space
        self.key = self._key(supernet, source)
        self.seconds: list[float] = []
        self.last_scores: dict[str, float] = {}

    def _key(self, supernet: Path, source: Path | None) -> str:
        settings = {k: v for k, v in asdict(self.settings).items()
                    if k not in ("progress", "log_evaluations")}
        sizes = [f"{task.name}:{len(data.train.examples)}/{sum(len(s.examples) for s in data.dev.values())}"
                 for task, data in zip(self.tasks, self.data)]
        digest = hashlib.sha256(json.dumps([settings, sizes, str(source)], sort_keys=True).encode()).hexdigest()[:12]
        return (f"finetune:{'+'.join(t.name for t in self.tasks)}:supernet={file_digest(supernet / 'model.safetensors')}"
                f":settings={digest}")

    def __call__(self, arch: Arch) -> float:
        from .export import extract
        from .tasks.finetune import finetune_encoder

        self.space.check(arch)
        start = time.perf_counter()
        encoder = extract(self.model, arch, encoder_only=True).to(self.device)
        self.last_scores = {task.name: finetune_encoder(encoder, self.tokenizer, task, data, self.settings).score
                            for task, data in zip(self.tasks, self.data)}
        self.seconds.append(time.perf_counter() - start)
        return sum(self.last_scores.values()) / len(self.last_scores)


def _selection_data(task, data):
    """With a carved validation split, candidates are scored on it and the dev set is never read."""
    from .tasks.finetune import TaskData

    if data.validation is None:
        return data
    return TaskData(data.train, {task.main_dev_split: data.validation}, {}, data.validation)


class TaskEvaluator:
    """Fitness = the sub-model's task score with the task SuperPLM's inherited task weights, on the
    validation split carved from the training data (`tasks.finetune.carve_validation`): one forward
    pass per candidate, as DynaBERT and whittle's PLM pruning score sub-networks. The dev set a
    user reports is never read. With ``retrain`` the score is taken instead after a task-KD retrain
    of ``settings``' budget from the fine-tuned ``teacher`` (Minitron's lightweight retraining,
    which settles rankings that flip right after pruning): minutes per candidate, for re-ranking a
    shortlist (`search.rerank`)."""

    def __init__(self, supernet: str | Path, task: str, data_dir: str | Path | None, *, settings: Any = None,
                 retrain: bool = False, teacher: str | Path | None = None, cache_dir: str | Path | None = None,
                 device: str = "cpu") -> None:
        from .modeling import SuperBertForSequenceClassification
        from .tasks import finetune

        self.task = finetune.resolve_task(task)
        if not isinstance(self.task, finetune.glue.GlueTask):
            raise UserError(f"the task evaluator scores GLUE-style tasks; {task} is not one")
        self.settings = replace(settings or finetune.FinetuneSettings(), progress=False, log_evaluations=False,
                                device=device, eval_every=None)
        if not self.settings.validation_examples:
            raise UserError("the task evaluator scores candidates on rows carved from the training data: set "
                            "--ft-validation-examples (e.g. 1000)")
        if data_dir is None:
            raise UserError("the task evaluator needs --data-dir (the task's glue_data folder)")
        self.data = _selection_data(self.task, finetune.load_task_data(self.task, Path(data_dir), test=False,
                                                                        settings=self.settings))
        supernet = Path(supernet)
        self.model, self.tokenizer, self.device = _load_supernet(supernet, device)
        if not isinstance(self.model, SuperBertForSequenceClassification):
            raise UserError(f"--supernet {supernet} has no task head; the task evaluator scores a task SuperPLM "
                            "(the task route's)")
        self.validation = finetune.glue_features(self.task, self.tokenizer, self.data.validation,
                                                  self.settings.sequence_length(self.task), with_labels=False)
        self.labels = finetune.glue.label_ids(self.task, self.data.validation.examples)
        self.space = self.model.config.search_space
        self.retrain, self.teacher, budget = retrain, None, ""
        if retrain:
            if teacher is None:
                raise UserError("re-ranking by retraining distils from the fine-tuned source: give --teacher")
            from .tasks.run import teacher_model_dir

            features = finetune.train_features(self.task, self.tokenizer, self.data.train, self.settings)
            self.teacher = finetune.TeacherLogits.cached(teacher_model_dir(Path(teacher), self.task), self.task, features,
                                                         finetune.padding_id(self.tokenizer), self.settings,
                                                         Path(cache_dir) if cache_dir else supernet)
            fields = {k: v for k, v in asdict(self.settings).items() if k not in ("progress", "log_evaluations", "device")}
            budget = ":retrain=" + hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:12]
        self.key = (f"task:{self.task.name}:supernet={file_digest(supernet / 'model.safetensors')}"
                    f":validation={len(self.labels)}:seed={self.settings.subset_seed}{budget}")
        self.seconds: list[float] = []

    def score(self, model) -> float:
        """The task score of a task model (the SuperPLM at an arch, or an extracted one) on the rows."""
        from .tasks import finetune, metrics

        outputs = finetune.predict_features(model, self.validation, finetune.padding_id(self.tokenizer),
                                             self.settings.eval_batch_size, False)
        return metrics.task_score(metrics.glue_metrics(self.task.name, finetune.glue_predictions(self.task, outputs),
                                                       self.labels))

    def __call__(self, arch: Arch) -> float:
        from .export import extract
        from .tasks.finetune import finetune_model

        self.space.check(arch)
        start = time.perf_counter()
        self.model.set_arch(arch)
        if not self.retrain:
            value = self.score(self.model)
        else:
            student = extract(self.model, arch).to(self.device)
            value = finetune_model(student, self.tokenizer, self.task, self.data, self.settings,
                                   teacher=self.teacher).validation_score
        self.seconds.append(time.perf_counter() - start)
        return value


# --- several processes ---------------------------------------------------------------------------
_worker_evaluator = None


def _start_worker(factory, kwargs: dict, threads: int) -> None:
    import torch

    global _worker_evaluator
    torch.set_num_threads(threads)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        pass
    _worker_evaluator = factory(**kwargs)


def _evaluate_in_worker(arch: str) -> tuple[float, float]:
    start = time.perf_counter()
    value = _worker_evaluator(Arch.parse(arch))
    return float(value), time.perf_counter() - start


class WorkerPool:
    """`evaluator` (built in this process: key, checks, single calls) plus `workers` processes,
    each holding `factory(**kwargs)`, for `imap` over a batch of architectures.

    Use as a context manager so the processes end with the search, also on errors.
    """

    def __init__(self, evaluator, factory, kwargs: dict, workers: int, threads: int | None = None) -> None:
        import multiprocessing

        if workers < 2:
            raise ValueError("a WorkerPool needs at least 2 workers")
        self.evaluator, self.key = evaluator, evaluator.key
        # Split the cores between the workers; several threads per small model scale badly anyway.
        threads = threads or max(1, (os.cpu_count() or 1) // workers)
        # spawn: a fork of a process that has used torch's thread pool can hang.
        context = multiprocessing.get_context("spawn")
        self.pool = context.Pool(workers, initializer=_start_worker, initargs=(factory, kwargs, threads))

    def __call__(self, arch: Arch) -> float:
        return self.evaluator(arch)

    def imap(self, archs: Iterable[Arch]) -> Iterator[tuple[float, float]]:
        """(fitness, seconds) per architecture, in order, as each finishes."""
        yield from self.pool.imap(_evaluate_in_worker, [str(arch) for arch in archs])

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, kind, *_rest) -> None:
        if kind is None:
            self.pool.close()
        else:
            self.pool.terminate()
        self.pool.join()
