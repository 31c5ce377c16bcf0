"""Fine-tuning and evaluation of a Hugging Face model on one GLUE or SQuAD task.

We use a small loop of our own rather than transformers' `Trainer`, because:
- the architecture search calls this in-process, many times, on in-memory models, and must
  get dev scores back without checkpoints, output folders or logging integrations;
- same seed => same result, without touching the caller's global RNG: the loop runs inside
  `torch.random.fork_rng()`, seeds its own dropout stream and shuffles with its own
  `torch.Generator` (Trainer seeds the global state and pulls in accelerate);
- the loop is about a hundred lines (dynamic padding, best-dev selection) on the toolkit shared
  with pre-training (`autotinybert.training`: AdamW groups, BERT's warm-up/decay schedule,
  clipping, pickle-free crash-safe checkpoints, SIGTERM handling) and stays stable across
  transformers major versions, whose Trainer arguments changed between v4 and v5.

Resume rule: the one of `autotinybert.training`. A `RunStore` continues from its checkpoint
when it holds one; `tasks.run` decides, from `--resume`, whether a run directory may be reused.

Public entry points:
- `finetune_model(model, tokenizer, task, data, settings)` -> `FinetuneResult`; the model ends
  with its best-dev weights. Pass a `RunStore` to persist checkpoints and resume.
- `evaluate_model(model, tokenizer, task, splits, settings)` -> scores per split.
- `load_task_model(path, task)` / `build_task_model(encoder, task)`: a task model from a
  checkpoint directory or from an in-memory encoder.
- `finetune_encoder(encoder, tokenizer, task, data, settings)`: both in one call, for the
  search's fine-tuning evaluator (the encoder itself is left unchanged).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import training
from ..errors import UserError
from ..files import atomic_write_with, recover, staged_directory
from ..settings import FinetuneSettings  # noqa: F401 - re-exported: the fine-tuning settings
from . import augment, distill as hidden, glue, metrics, squad

Task = glue.GlueTask | squad.SquadTask


def resolve_task(name: str) -> Task:
    """A GLUE or SQuAD task by name (case-insensitive; sst-2 / sst2, squad / squad_v2, ...)."""
    if name.lower().startswith("squad"):
        return squad.squad_task(name)
    try:
        return glue.glue_task(name)
    except UserError:
        raise UserError(f"unknown task {name!r}; choose one of {', '.join([*glue.GLUE_TASKS, *squad.SQUAD_TASKS])}") from None


# --- data ------------------------------------------------------------------------------------

@dataclass
class TaskData:
    """Everything one task run reads: train, labelled dev splits, unlabeled test splits, and the
    validation split carved from train (`carve_validation`) that model selection uses when given."""

    train: Any | None
    dev: dict[str, Any]
    test: dict[str, Any] = field(default_factory=dict)
    validation: Any | None = None


# A different stream from the training subset's, so the carved rows do not depend on the budget.
_VALIDATION_SEED_OFFSET = 7919


def carve_validation(split, limit: int, seed: int = 0) -> tuple[Any, Any]:
    """(rest, validation): up to ``limit`` examples of a training split, at most a tenth of it,
    drawn with ``seed``; the two are disjoint and keep file order. Model selection and the search's
    fitness read the validation rows so the dev set a user reports stays unseen (DESIGN)."""
    size = min(limit, len(split.examples) // 10)
    if size < 1:
        raise UserError(f"{split.task} train has {len(split.examples)} examples: too few to carve a validation split "
                        "(a tenth of them); drop --validation-examples")
    chosen = set(random.Random(seed + _VALIDATION_SEED_OFFSET).sample(range(len(split.examples)), size))
    rest = tuple(e for i, e in enumerate(split.examples) if i not in chosen)
    validation = tuple(e for i, e in enumerate(split.examples) if i in chosen)
    return dataclasses.replace(split, examples=rest), dataclasses.replace(split, split="validation", examples=validation)


def load_task_data(task: Task, data_dir: str | Path | None, *, train: bool = True, test: bool = True,
                   train_file: str | Path | None = None, dev_file: str | Path | None = None,
                   settings: FinetuneSettings | None = None, loader: Callable | None = None) -> TaskData:
    """Load `task` from `data_dir` (local layout) or the hub (`data_dir` None), with the
    settings' example budgets applied. SQuAD may name its JSON files directly."""
    settings = settings or FinetuneSettings()
    if isinstance(task, squad.SquadTask):
        train_split = squad.load_split(task, "train", data_dir, train_file, loader) if train else None
        dev = {"dev": squad.load_split(task, "dev", data_dir, dev_file, loader)}
        tests: dict[str, Any] = {}
        sample = squad.subset
    else:
        if train_file or dev_file:
            raise UserError("--train-file / --dev-file are for SQuAD; GLUE tasks read --data-dir")
        train_split = glue.load_split(task, "train", data_dir, loader) if train else None
        dev = {name: glue.load_split(task, name, data_dir, loader) for name in task.dev_files}
        tests = ({name: glue.load_split(task, name, data_dir, loader) for name in glue.available_test_splits(task, data_dir)}
                 if test else {})
        sample = glue.subset
    validation = None
    if train_split is not None and settings.validation_examples:
        train_split, validation = carve_validation(train_split, settings.validation_examples, settings.subset_seed)
    if train_split is not None:
        train_split = sample(train_split, settings.max_train_examples, settings.subset_seed)
    dev = {name: sample(split, settings.max_eval_examples, settings.subset_seed) for name, split in dev.items()}
    return TaskData(train_split, dev, tests, validation)


# --- models ----------------------------------------------------------------------------------

def _auto_class(task: Task):
    import transformers

    if isinstance(task, squad.SquadTask):
        return transformers.AutoModelForQuestionAnswering
    return transformers.AutoModelForSequenceClassification


def _task_config_fields(task: Task) -> dict[str, Any]:
    if isinstance(task, squad.SquadTask):
        return {}
    if task.is_regression:
        return {"num_labels": 1, "problem_type": "regression", "id2label": {0: "score"}, "label2id": {"score": 0}}
    return {"num_labels": task.num_labels, "problem_type": "single_label_classification",
            "id2label": dict(enumerate(task.labels)), "label2id": {n: i for i, n in enumerate(task.labels)}}


def load_task_model(path: str | Path, task: Task, *, finetuned: bool = False, seed: int = 42, flag: str = "--model",
                    trust_remote_code: bool = False):
    """A task model from a checkpoint directory. Our exported ``autotinybert`` type loads through
    this package's classes; other custom code in the folder runs only with `trust_remote_code`.

    `finetuned=False`: a pre-trained encoder gets a fresh task head, initialised from `seed`
    without touching the global RNG. `finetuned=True`: every weight must come from the files and
    the head must fit `task`.
    """
    from ..checkpoint import load_pretrained

    path = Path(path)
    auto = _auto_class(task)
    extra = {} if finetuned else {**_task_config_fields(task), "ignore_mismatched_sizes": True}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, info = load_pretrained(auto, path, flag, trust_remote_code, output_loading_info=True, **extra)
    _check_loaded(model, info, path, task, finetuned)
    return model


def _check_loaded(model, info: dict, path: Path, task: Task, finetuned: bool) -> None:
    prefix = f"{model.base_model_prefix}."
    missing = sorted(info.get("missing_keys", []))
    if finetuned:
        if missing:
            raise UserError(f"{path} lacks {missing[0]} (and {len(missing) - 1} more); is it a model fine-tuned on {task.name}?")
        expected = 2 if isinstance(task, squad.SquadTask) else task.num_labels
        if not isinstance(task, squad.SquadTask) and model.config.num_labels != expected:
            raise UserError(f"{path} has {model.config.num_labels} outputs but {task.name} needs {expected}; "
                            f"is it fine-tuned on another task?")
        return
    # The encoder itself must load; only the head (and BERT's pooler, absent from MLM checkpoints) may be new.
    encoder_missing = [k for k in missing if k.startswith(prefix) and ".pooler." not in f".{k}"]
    if encoder_missing:
        raise UserError(f"{path} has no weights for {encoder_missing[0]} (and {len(encoder_missing) - 1} more); "
                        f"is it a checkpoint of this model type?")


def build_task_model(encoder, task: Task, *, seed: int = 42):
    """A task model around a copy of an in-memory encoder (BertModel-like, or a model that
    contains one under `base_model_prefix`, e.g. BertForMaskedLM). The head is initialised from
    `seed` inside a forked RNG; the encoder's weights are copied in, the pooler kept if present.
    """
    config = copy.deepcopy(encoder.config)
    for name, value in _task_config_fields(task).items():
        setattr(config, name, value)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _auto_class(task).from_config(config)  # our own type is registered: no code from any folder
    base = getattr(encoder, encoder.base_model_prefix, encoder)
    target = getattr(model, model.base_model_prefix)
    result = target.load_state_dict(base.state_dict(), strict=False)
    # BERT's pooler exists in some classes only (not in *ForMaskedLM / *ForQuestionAnswering).
    missing = [k for k in result.missing_keys if not k.startswith("pooler.")]
    unexpected = [k for k in result.unexpected_keys if not k.startswith("pooler.")]
    if missing or unexpected:
        raise ValueError(f"encoder and task model disagree: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.to(next(encoder.parameters()).device)


# --- features and batches --------------------------------------------------------------------

_INPUT_KEYS = ("input_ids", "token_type_ids", "attention_mask")


def glue_features(task: glue.GlueTask, tokenizer, split, max_length: int, with_labels: bool) -> list[dict]:
    examples = split.examples
    second = [e.text_b for e in examples] if task.train_columns.text_b is not None else None
    encoding = tokenizer([e.text_a for e in examples], second, truncation=True, max_length=max_length)
    keys = [k for k in _INPUT_KEYS if k in encoding]
    features = [{k: encoding[k][i] for k in keys} for i in range(len(examples))]
    if with_labels:
        for feature, label in zip(features, glue.label_ids(task, examples)):
            feature["labels"] = label
    return features


def collate(features: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest feature in the batch (dynamic padding: short GLUE inputs stay cheap)."""
    width = max(len(f["input_ids"]) for f in features)
    batch = {}
    for key in _INPUT_KEYS:
        if key in features[0]:
            fill = pad_id if key == "input_ids" else 0
            batch[key] = torch.tensor([f[key] + [fill] * (width - len(f[key])) for f in features], dtype=torch.long)
    for key in ("labels", "start_positions", "end_positions"):
        if key in features[0]:
            dtype = torch.float32 if isinstance(features[0][key], float) else torch.long
            batch[key] = torch.tensor([f[key] for f in features], dtype=dtype)
    return batch


def _device_of(model) -> torch.device | None:
    """Where a torch model's weights live (None for an ONNX Runtime session: it takes CPU tensors)."""
    return getattr(model, "device", None) if isinstance(model, torch.nn.Module) else None


def head_outputs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The heads' outputs: (logits,) for GLUE, (start_logits, end_logits) for SQuAD."""
    return _heads(model(**_model_inputs(model, batch)))


def _model_inputs(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch's model inputs, on the model's device."""
    device = _device_of(model)
    return {k: v if device is None else v.to(device) for k, v in batch.items() if k in _INPUT_KEYS}


def task_loss(task: Task, student: tuple[torch.Tensor, ...], batch: dict, teacher: tuple[torch.Tensor, ...] | None,
          settings: FinetuneSettings) -> torch.Tensor:
    """Cross-entropy (MSE for STS-B); with a teacher, mixed with logits distillation
    (Hinton et al. 2015: KL between temperature-softened distributions, scaled by T^2)."""
    if isinstance(task, squad.SquadTask):
        targets = (batch["start_positions"], batch["end_positions"])
    else:
        targets = (batch["labels"],)
    losses = []
    for index, (logits, target) in enumerate(zip(student, targets)):
        regression = not isinstance(task, squad.SquadTask) and task.is_regression
        hard = F.mse_loss(logits.squeeze(-1), target) if regression else F.cross_entropy(logits, target)
        if teacher is None:
            losses.append(hard)
            continue
        if regression:
            soft = F.mse_loss(logits.squeeze(-1), teacher[index].squeeze(-1))
        else:
            t = settings.kd_temperature
            soft = F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(teacher[index] / t, -1),
                            log_target=True, reduction="batchmean") * t * t
        losses.append(settings.kd_alpha * soft + (1 - settings.kd_alpha) * hard)
    return sum(losses) / len(losses)


# --- evaluation ------------------------------------------------------------------------------

@torch.no_grad()
def predict_features(model, features: Sequence[dict], pad_id: int, batch_size: int, token_level: bool,
                      progress: bool = False, desc: str = "eval") -> list[tuple]:
    """Head outputs per feature (numpy), batched by length so padding stays small."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    outputs: list[tuple | None] = [None] * len(features)
    try:
        for begin in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
            chunk = order[begin: begin + batch_size]
            heads = [h.float().cpu().numpy() for h in head_outputs(model, collate([features[i] for i in chunk], pad_id))]
            for row, i in enumerate(chunk):
                width = len(features[i]["input_ids"])
                outputs[i] = tuple(h[row, :width] if token_level else h[row] for h in heads)
    finally:
        model.train(was_training)
    return outputs


def glue_predictions(task: glue.GlueTask, outputs: Sequence[tuple]) -> list:
    if task.is_regression:
        return [float(o[0][0]) for o in outputs]
    return [int(o[0].argmax()) for o in outputs]


def predict_glue(model, tokenizer, task: glue.GlueTask, split, settings: FinetuneSettings) -> list:
    """Label indices (or STS-B scores) for every example of `split`, labelled or not."""
    features = glue_features(task, tokenizer, split, settings.sequence_length(task), with_labels=False)
    outputs = predict_features(model, features, padding_id(tokenizer), settings.eval_batch_size, False,
                                settings.progress, f"{task.name} {split.split}")
    return glue_predictions(task, outputs)


def predict_squad(model, tokenizer, task: squad.SquadTask, split, settings: FinetuneSettings) -> dict[str, squad.SpanPrediction]:
    length = settings.sequence_length(task)
    features = squad.eval_features(tokenizer, split.examples, length, settings.doc_stride)
    outputs = predict_features(model, features, padding_id(tokenizer), settings.eval_batch_size, True,
                                settings.progress, f"{task.name} {split.split}")
    return squad.best_spans(split.examples, features, [o[0] for o in outputs], [o[1] for o in outputs],
                            settings.n_best, settings.max_answer_length)


def evaluate_split(model, tokenizer, task: Task, split, settings: FinetuneSettings) -> tuple[dict[str, float], Any]:
    """Metrics on one labelled split, and the predictions they came from."""
    if isinstance(task, squad.SquadTask):
        spans = predict_squad(model, tokenizer, task, split, settings)
        answers = squad.final_answers(spans, task.with_no_answer, settings.null_score_threshold)
        odds = squad.null_odds(spans) if task.with_no_answer else None
        scores = metrics.squad_scores(answers, squad.gold_answers(split.examples), odds,
                                      {q: s.text for q, s in spans.items()})
        return scores, answers
    predictions = predict_glue(model, tokenizer, task, split, settings)
    return metrics.glue_metrics(task.name, predictions, glue.label_ids(task, split.examples)), predictions


def evaluate_model(model, tokenizer, task: Task, splits: dict[str, Any], settings: FinetuneSettings | None = None) -> dict[str, dict[str, float]]:
    """Scores on each labelled split, e.g. {"dev_matched": {...}, "dev_mismatched": {...}}."""
    settings = settings or FinetuneSettings()
    return {name: evaluate_split(model, tokenizer, task, split, settings)[0] for name, split in splits.items()}


def main_score(task: Task, scores: dict[str, dict[str, float]]) -> float:
    """The number model selection maximises: SQuAD F1; GLUE task score on the main dev split."""
    return split_score(task, scores[task.main_dev_split])


def split_score(task: Task, scores: dict[str, float]) -> float:
    """One split's main number: SQuAD F1, or the GLUE task score."""
    return scores["f1"] if isinstance(task, squad.SquadTask) else metrics.task_score(scores)


def padding_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


# --- training --------------------------------------------------------------------------------

@dataclass
class FinetuneResult:
    scores: dict[str, dict[str, float]]      # best checkpoint's metrics per dev split
    score: float                             # main_score of `scores`
    best_step: int
    steps: int
    train_examples: int
    train_features: int
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    predictions: dict[str, Any] | None = None  # the best evaluation's, per dev split (None after a resume)
    validation_score: float | None = None    # the carved validation split's score that selected it


@dataclass
class TrainState:
    step: int = 0
    best_score: float | None = None          # what selection maximises: validation score if carved, else dev
    best_step: int = 0
    best_scores: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    running_loss: float = 0.0                # training loss summed since the last evaluation
    running_steps: int = 0


def train_features(task: Task, tokenizer, split, settings: FinetuneSettings) -> list[dict]:
    length = settings.sequence_length(task)
    if isinstance(task, squad.SquadTask):
        return squad.train_features(tokenizer, split.examples, length, settings.doc_stride)
    return glue_features(task, tokenizer, split, length, with_labels=True)


def train_rows(task: Task, tokenizer, split, settings: FinetuneSettings) -> list[dict]:
    """What training iterates over: the training features, then (with ``augment_copies``) their
    perturbed copies, seeded by the run's seed; `finetune_model` gives the copies the teacher's labels."""
    features = train_features(task, tokenizer, split, settings)
    if not settings.augment_copies:
        return features
    check_distillation(settings, teacher_given=True, tasks=[task])
    return features + augment.perturbed_copies(features, settings.augment_copies, settings.augment_rate, settings.seed,
                                               set(tokenizer.all_special_ids))


def check_distillation(settings: FinetuneSettings, teacher_given: bool, tasks: Sequence[Task]) -> None:
    """The hidden-state term and the augmentation need a teacher; augmentation needs GLUE rows."""
    if settings.kd_hidden and not teacher_given:
        raise UserError("--kd-hidden distils a teacher's hidden states: pass --teacher DIR, or drop --kd-hidden")
    if settings.augment_copies and not teacher_given:
        raise UserError("--augment-copies needs --teacher DIR (the teacher labels the copies), or drop it")
    if settings.augment_copies and any(isinstance(t, squad.SquadTask) for t in tasks):
        raise UserError("--augment-copies works for GLUE tasks (a SQuAD answer span does not survive replaced tokens)")


def _teacher_labels(task: Task, teacher, features: Sequence[dict], first: int, pad_id: int,
                    settings: FinetuneSettings) -> list:
    """The teacher's answer (class or score) for ``features[first:]``."""
    if isinstance(teacher, TeacherLogits):
        outputs = [(row,) for row in teacher.outputs[0][first:].numpy()]
    else:
        outputs = predict_features(teacher, features[first:], pad_id, settings.eval_batch_size, False)
    return glue_predictions(task, outputs)


def plan_steps(num_features: int, settings: FinetuneSettings) -> tuple[int, int, set[int]]:
    """(steps per epoch, total steps, steps after which to evaluate)."""
    per_epoch = math.ceil(num_features / settings.batch_size)
    total = settings.max_steps or max(1, math.ceil(settings.epochs * per_epoch))
    evaluate_at = {total} | {k * per_epoch for k in range(1, total // per_epoch + 1)}
    if settings.eval_every:
        evaluate_at |= set(range(settings.eval_every, total + 1, settings.eval_every))
    return per_epoch, total, evaluate_at


def _schedule(total: int, settings: FinetuneSettings) -> training.Schedule:
    """Linear warm-up over `warmup_ratio` of the steps, then linear decay to 0 (BERT)."""
    return training.Schedule(settings.learning_rate, total, settings.warmup_ratio)


def epoch_order(features: Sequence[dict], settings: FinetuneSettings, epoch: int) -> list[int]:
    """The shuffle of one epoch, a function of (seed, epoch) only, so a resumed run replays it.

    With `group_by_length`, each chunk of 50 batches of the shuffle is sorted by length (as
    transformers' LengthGroupedSampler does): batches hold similar lengths, padding shrinks.
    """
    generator = torch.Generator().manual_seed(settings.seed * 100_003 + epoch)
    order = torch.randperm(len(features), generator=generator).tolist()
    if not settings.group_by_length:
        return order
    chunk = 50 * settings.batch_size
    grouped = []
    for begin in range(0, len(order), chunk):
        grouped += sorted(order[begin: begin + chunk], key=lambda i: -len(features[i]["input_ids"]))
    return grouped


def finetune_model(model, tokenizer, task: Task, data: TaskData, settings: FinetuneSettings | None = None, *,
                   teacher=None, store: "RunStore | None" = None) -> FinetuneResult:
    """Fine-tune `model` on `data.train`, evaluating on `data.dev` and keeping the best weights.

    In memory unless `store` is given (then checkpoints after each evaluation and resumes from
    them). The caller's global RNG state is left as it was; same inputs and seed => same result.
    """
    settings = settings or FinetuneSettings()
    settings.validate()
    if data.train is None:
        raise UserError(f"{task.name}: no training data")
    if isinstance(teacher, torch.nn.Module) and teacher.config.vocab_size != model.config.vocab_size:
        raise UserError("the teacher and the student must share a vocabulary (vocab sizes differ)")
    model.to(settings.device)
    features = train_rows(task, tokenizer, data.train, settings)
    teacher = _prepared_teacher(teacher, task, tokenizer, features, settings)
    if settings.augment_copies:
        originals = len(features) // (1 + settings.augment_copies)
        augment.relabel(features[originals:], _teacher_labels(task, teacher, features, originals, padding_id(tokenizer),
                                                              settings))
    # With the hidden-state term the projection trains beside the model and is checkpointed with
    # it (one module for the optimiser and the checkpoint); the saved model stays the model alone.
    distiller = hidden.HiddenStateDistillation.between(model, teacher).to(settings.device) if settings.kd_hidden else None
    trained = _checkpointed(model, distiller)
    plan = plan_steps(len(features), settings)
    optimizer = training.adamw(trained, settings.learning_rate, settings.weight_decay)
    state, best_weights = TrainState(), None
    # SIGTERM is caught only when there is a store to save a checkpoint into.
    stop = training.StopOnSigterm("finetune") if store is not None else contextlib.nullcontext()
    with torch.random.fork_rng(devices=[]), stop:
        torch.manual_seed(settings.seed)  # dropout stream of this run only
        if store is not None:
            store.recover()
            if store.has_checkpoint():
                state = store.load_checkpoint(trained, optimizer)
        if isinstance(teacher, torch.nn.Module):
            teacher.to(settings.device).eval()
        if distiller is not None and state.step == 0:
            _fit_projection(distiller, model, teacher, features, padding_id(tokenizer), settings)
        state, best_weights, best_predictions = _train_loop(model, tokenizer, task, data, settings, features, optimizer,
                                                            teacher, store, state, plan, stop, distiller)
    if best_weights is not None:
        model.load_state_dict(best_weights)
    elif store is not None and store.has_best():
        store.load_best(model)
    return FinetuneResult(state.best_scores, main_score(task, state.best_scores), state.best_step, state.step,
                          len(data.train.examples), len(features), state.history, state.train_seconds, best_predictions,
                          state.best_score if data.validation is not None else None)


def _prepared_teacher(teacher, task: Task, tokenizer, features: Sequence[dict], settings: FinetuneSettings):
    """The teacher as training uses it: its recorded logits where they are all it gives, else the model."""
    check_distillation(settings, teacher is not None, [task])
    if settings.kd_hidden and not isinstance(teacher, torch.nn.Module):
        raise ValueError("the hidden-state term (kd_hidden) needs the teacher model, not recorded logits")
    if isinstance(teacher, torch.nn.Module) and not isinstance(task, squad.SquadTask) and not settings.kd_hidden:
        # The teacher runs in eval mode: its logits on each training row never change, so one pass
        # over the rows replaces a teacher forward pass per step and epoch.
        return TeacherLogits.record(teacher.to(settings.device), features, padding_id(tokenizer), settings)
    if isinstance(teacher, TeacherLogits) and len(teacher) != len(features):
        raise ValueError(f"recorded teacher logits cover {len(teacher)} rows, the training data has {len(features)}")
    return teacher


def _checkpointed(model, distiller) -> torch.nn.Module:
    """What the optimiser steps and a checkpoint holds: the model, and the projection when it trains."""
    return model if distiller is None else torch.nn.ModuleDict({"model": model, "hidden_distillation": distiller})


# Training rows the hidden-state projection is fitted on before the first step.
PROJECTION_FIT_ROWS = 256


@torch.no_grad()
def _fit_projection(distiller, model, teacher, features: Sequence[dict], pad_id: int, settings: FinetuneSettings) -> None:
    """Least-squares fit of the hidden-state projection on the first rows of epoch 0 (eval mode)."""
    rows = epoch_order(features, settings, 0)[:PROJECTION_FIT_ROWS]
    was_training, pairs = model.training, []
    model.eval()
    for begin in range(0, len(rows), settings.batch_size):
        batch = collate([features[i] for i in rows[begin: begin + settings.batch_size]], pad_id)
        student, taught = _with_hidden_states(model, batch), _with_hidden_states(teacher, batch)
        pairs.append((student.hidden_states, taught.hidden_states, batch["attention_mask"].to(settings.device)))
    model.train(was_training)
    distiller.fit(pairs)


def _with_hidden_states(model, batch: dict[str, torch.Tensor]):
    return model(**_model_inputs(model, batch), output_hidden_states=True)


def _heads(outputs) -> tuple[torch.Tensor, ...]:
    if hasattr(outputs, "start_logits"):
        return outputs.start_logits, outputs.end_logits
    return (outputs.logits,)


def _train_loop(model, tokenizer, task, data, settings, features, optimizer, teacher, store, state, plan, stop,
                distiller=None):
    per_epoch, total, evaluate_at = plan
    schedule, pad_id, trained = _schedule(total, settings), padding_id(tokenizer), _checkpointed(model, distiller)
    best = {"weights": None, "predictions": None}
    model.train()
    bar = training.progress_bar(total, state.step, f"{task.name} train", settings.progress)
    started = time.perf_counter()
    try:
        while state.step < total:
            epoch, position = divmod(state.step, per_epoch)
            rows = epoch_order(features, settings, epoch)[position * settings.batch_size:(position + 1) * settings.batch_size]
            batch = collate([features[i] for i in rows], pad_id)
            loss = _training_step(model, task, batch, rows, optimizer, teacher, settings, schedule, state.step,
                                  distiller)
            state.step += 1
            state.running_loss, state.running_steps = state.running_loss + loss, state.running_steps + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if state.step in evaluate_at:
                state.train_seconds += time.perf_counter() - started
                _evaluate_and_keep(model, tokenizer, task, data, settings, state, best, store, bar, per_epoch, total)
                if store is not None:
                    store.save_checkpoint(trained, optimizer, state)
                model.train()
                started = time.perf_counter()
            elif getattr(stop, "requested", False) and state.step < total:
                state.train_seconds += time.perf_counter() - started
                store.save_checkpoint(trained, optimizer, state)
            if getattr(stop, "requested", False) and state.step < total:
                raise stop.preempted(state.step)
    finally:
        bar.close()
    return state, best["weights"], best["predictions"]


def _evaluate_and_keep(model, tokenizer, task, data, settings, state: TrainState, best: dict, store, bar,
                       per_epoch: int, total: int) -> None:
    """Dev scores now; a new best is kept in memory and, with a store, on disk."""
    evaluated = {name: evaluate_split(model, tokenizer, task, split, settings) for name, split in data.dev.items()}
    scores = {name: result[0] for name, result in evaluated.items()}
    score = selected = main_score(task, scores)
    train_loss = state.running_loss / state.running_steps
    entry = {"step": state.step, "epoch": round(state.step / per_epoch, 3), "train_loss": train_loss, "score": score,
             "scores": scores}
    if data.validation is not None:  # select on the carved split; dev is only reported
        selected = entry["validation_score"] = split_score(task, evaluate_split(model, tokenizer, task, data.validation,
                                                                                settings)[0])
    state.history.append(entry)
    if settings.log_evaluations:
        on_validation = f", validation score {selected:.2f}" if data.validation is not None else ""
        bar.write(f"{task.name} step {state.step}/{total}: train loss {train_loss:.4f}, dev score {score:.2f}"
                  + on_validation)
    state.running_loss, state.running_steps = 0.0, 0
    if state.best_score is None or selected > state.best_score:
        state.best_score, state.best_step, state.best_scores = selected, state.step, scores
        best["weights"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        best["predictions"] = {name: result[1] for name, result in evaluated.items()}
        if store is not None:
            store.save_best(model, tokenizer)


def _training_step(model, task, batch, rows: list[int], optimizer, teacher, settings, schedule: training.Schedule,
                   step: int, distiller=None) -> float:
    batch = {k: v.to(settings.device) for k, v in batch.items()}
    if distiller is not None:
        loss = _loss_with_hidden_states(model, task, batch, teacher, settings, distiller)
    else:
        teacher_outputs = None
        if isinstance(teacher, TeacherLogits):
            teacher_outputs = teacher.rows(rows, settings.device)
        elif teacher is not None:
            with torch.no_grad():
                teacher_outputs = tuple(t.detach() for t in head_outputs(teacher, batch))
        loss = task_loss(task, head_outputs(model, batch), batch, teacher_outputs, settings)
    loss.backward()
    schedule.apply(optimizer, step)
    training.clip_and_step(optimizer, _checkpointed(model, distiller).parameters(), settings.max_grad_norm)
    return float(loss.detach())


def _loss_with_hidden_states(model, task, batch, teacher, settings: FinetuneSettings, distiller) -> torch.Tensor:
    """The logits term plus kd_hidden x the layer-mapped hidden-state term (one live teacher pass)."""
    with torch.no_grad():
        taught = _with_hidden_states(teacher, batch)
    student = _with_hidden_states(model, batch)
    logits = task_loss(task, _heads(student), batch, tuple(t.detach() for t in _heads(taught)), settings)
    return logits + settings.kd_hidden * distiller.loss(student.hidden_states, taught.hidden_states,
                                                        batch["attention_mask"])


class TeacherLogits:
    """A fine-tuned teacher's head outputs on every training row, computed once (eval mode, as
    the live teacher gives them) and looked up by row during training: distilling several
    students, or one for several epochs, costs one teacher pass over the data."""

    def __init__(self, outputs: tuple[torch.Tensor, ...]) -> None:
        self.outputs = outputs                      # per head: (rows, labels)

    def __len__(self) -> int:
        return self.outputs[0].shape[0]

    def rows(self, rows: list[int], device: str | torch.device = "cpu") -> tuple[torch.Tensor, ...]:
        index = torch.tensor(rows, dtype=torch.long)
        return tuple(o[index].to(device) for o in self.outputs)

    @classmethod
    def record(cls, teacher, features: Sequence[dict], pad_id: int, settings: FinetuneSettings) -> "TeacherLogits":
        outputs = predict_features(teacher, features, pad_id, settings.eval_batch_size, False, settings.progress,
                                    "teacher logits")
        return cls(tuple(torch.from_numpy(np.stack([o[h] for o in outputs]))
                         for h in range(len(outputs[0]))))

    @classmethod
    def cached(cls, teacher_dir: str | Path, task: Task, features: Sequence[dict], pad_id: int,
               settings: FinetuneSettings, cache_dir: str | Path) -> "TeacherLogits":
        """Record once per (teacher weights, training rows): later students of the same teacher and
        data read ``cache_dir/teacher-logits-<key>.safetensors``."""
        import hashlib
        import json

        weights = sorted(Path(teacher_dir).glob("*.safetensors"))
        key = hashlib.sha256(json.dumps([[w.name, w.stat().st_size, w.stat().st_mtime_ns] for w in weights]
                                        + [[f["input_ids"], f.get("token_type_ids")] for f in features]).encode())
        path = Path(cache_dir) / f"teacher-logits-{key.hexdigest()[:16]}.safetensors"
        if path.is_file():
            return cls.load(path)
        teacher = load_task_model(teacher_dir, task, finetuned=True, flag="--teacher").to(settings.device)
        recorded = cls.record(teacher, features, pad_id, settings)
        recorded.save(path)
        return recorded

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        atomic_write_with(Path(path), lambda p: save_file({f"head{i}": o for i, o in enumerate(self.outputs)}, str(p)))

    @classmethod
    def load(cls, path: str | Path) -> "TeacherLogits":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        return cls(tuple(tensors[f"head{i}"] for i in range(len(tensors))))


def finetune_encoder(encoder, tokenizer, task: Task, data: TaskData, settings: FinetuneSettings | None = None,
                     *, teacher=None) -> FinetuneResult:
    """Dev scores of `encoder` fine-tuned on `task`, all in memory (no files written).

    The paper's fitness for a candidate architecture (sec. 3.3) is such a score (MNLI-m accuracy,
    SQuAD F1) of the sub-model with inherited weights; `encoder` is copied, never modified.
    """
    settings = settings or FinetuneSettings()
    model = build_task_model(encoder, task, seed=settings.seed)
    return finetune_model(model, tokenizer, task, data, settings, teacher=teacher)


# --- persistence for the command line (resume) -------------------------------------------------

class RunStore:
    """One task's files under `directory`: the best model (`model/`, save_pretrained + tokenizer,
    loadable by AutoModelFor*), its weights under the module's own keys (`best.safetensors`), and
    the last checkpoint (`checkpoint/`, `training.save_checkpoint`: weights, optimizer state and
    the dropout RNG state in safetensors, counters in JSON) that `--resume` continues from.
    Every write is crash-safe; `recover()` undoes what a killed attempt left behind."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.model_dir = self.directory / "model"
        self.checkpoint_dir = self.directory / "checkpoint"

    def recover(self) -> None:
        recover(self.directory)

    def has_checkpoint(self) -> bool:
        return training.has_checkpoint(self.checkpoint_dir)

    @property
    def best_weights(self) -> Path:
        # Kept beside model/ so resuming restores exactly the module's own state_dict keys.
        return self.directory / "best.safetensors"

    def has_best(self) -> bool:
        return self.best_weights.is_file()

    def save_best(self, model, tokenizer) -> None:
        from safetensors.torch import save_model

        with staged_directory(self.model_dir, overwrite=True) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        atomic_write_with(self.best_weights, lambda p: save_model(model, str(p)))

    def load_best(self, model) -> None:
        from safetensors.torch import load_model

        load_model(model, str(self.best_weights), strict=True)

    def save_checkpoint(self, model, optimizer, state: TrainState) -> None:
        training.save_checkpoint(self.checkpoint_dir, model, optimizer, asdict(state),
                                 tensors={"rng_state": torch.get_rng_state()})

    def load_checkpoint(self, model, optimizer) -> TrainState:
        """Restore weights, optimizer and the dropout RNG (call inside the run's fork_rng)."""
        saved, tensors = training.load_checkpoint(self.checkpoint_dir, model, optimizer)
        torch.set_rng_state(tensors["rng_state"])
        known = {f.name for f in fields(TrainState)}
        return TrainState(**{k: v for k, v in saved.items() if k in known})
