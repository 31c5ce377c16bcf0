"""The task route's SuperPLM: a fine-tuned source made elastic and trained on its task.

What DynaBERT and whittle's PLM pruning do, and what a user with a fine-tuned model and a task
wants: every sub-model carries task weights, so an architecture is scored by one pass over
held-out task rows (`evaluators.TaskEvaluator`) instead of a loss on text (which ranked
architectures backwards from a pre-trained start: docs/results/results-pretrained.md).

* `build`: the fine-tuned source (a `BertForSequenceClassification` checkpoint) in importance
  order (`importance`: hidden channels, FFN neurons, heads / head dims by their activations on the
  task's own training text), with a fixed depth order (`space.depth_layers`: which layers a depth-L
  sub-model keeps), copied into a `SuperBertForSequenceClassification` whose largest sub-model is
  the source (checked: logits within `MAX_DIFF`).
* `train`: sandwich sampling (the largest, the smallest and ``random_sub_models`` random
  sub-models per step, gradients summed; Yu & Huang 2019, DynaBERT, whittle), each distilled from
  the fine-tuned teacher's logits recorded once (`tasks.finetune.TeacherLogits`), mixed with the
  labels by ``kd_alpha``. Crash-safe checkpoints, SIGTERM, resume: the toolkit of `training`;
  the sub-models of step s are a function of (seed, s), so a resumed run replays the same ones.
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import importance, training
from .errors import UserError
from .modeling import SuperBertConfig, SuperBertForSequenceClassification, new_supernet
from .pretrained import source_space
from .settings import FinetuneSettings, TaskSuperPLMSettings
from .space import Arch, SearchSpace, depth_layers
from .tasks import finetune

MAX_DIFF = 1e-4
CHECKPOINT_DIR = "checkpoint"


# --- building from the fine-tuned source ----------------------------------------------------------
def load_finetuned_source(path: str | Path, task, trust_remote_code: bool = False):
    """The fine-tuned source as a stock `BertForSequenceClassification` (every weight from the files)."""
    model = finetune.load_task_model(path, task, finetuned=True, flag="--teacher", trust_remote_code=trust_remote_code)
    if model.config.model_type != "bert":
        raise UserError(f"{path}: model_type {model.config.model_type!r}; the task route starts from a BERT-family "
                        "classifier (model_type bert)")
    return model.eval()


def calibration_batches(features: list[dict], pad_id: int, count: int, seed: int, batch_size: int = 32) -> list[dict]:
    """``count`` training rows drawn with ``seed``, collated (the rows the importance order is read on)."""
    rows = sorted(random.Random(seed).sample(range(len(features)), min(count, len(features))))
    return [finetune.collate([features[i] for i in rows[b:b + batch_size]], pad_id)
            for b in range(0, len(rows), batch_size)]


def _superplm_config(source_config, space: SearchSpace, mode: str) -> SuperBertConfig:
    c = source_config
    return SuperBertConfig.from_space(
        space, vocab_size=c.vocab_size, max_position_embeddings=c.max_position_embeddings,
        type_vocab_size=c.type_vocab_size, hidden_act=c.hidden_act, layer_norm_eps=c.layer_norm_eps,
        hidden_dropout_prob=c.hidden_dropout_prob, initializer_range=c.initializer_range,
        attention_probs_dropout_prob=c.attention_probs_dropout_prob, pad_token_id=c.pad_token_id or 0,
        num_labels=c.num_labels, id2label=c.id2label, label2id=c.label2id, problem_type=c.problem_type,
        classifier_dropout=getattr(c, "classifier_dropout", None))


def build(source, mode: str, orders: importance.Orders, seed: int = 0) -> SuperBertForSequenceClassification:
    """A task SuperPLM holding the fine-tuned ``source``'s weights in ``orders`` (first-L depth order)."""
    space = source_space(source.config, mode)
    model = new_supernet(_superplm_config(source.config, space, mode), seed, SuperBertForSequenceClassification)
    permuted = importance.permute(source.state_dict(), importance.Shape.of(source.config), orders)
    state = model.state_dict()
    for name in state:
        state[name] = permuted[name].clone()
    model.load_state_dict(state, strict=True)
    return model.eval()


@torch.no_grad()
def logits_of(model, batches: list[dict]) -> torch.Tensor:
    """(rows, labels) logits of ``model`` (a stock classifier or the SuperPLM at its arch), eval mode."""
    was_training = model.training
    model.eval()
    try:
        keys = ("input_ids", "attention_mask", "token_type_ids")
        return torch.cat([model(**{k: b[k] for k in keys if k in b}).logits for b in batches])
    finally:
        model.train(was_training)


def layer_scores(model: SuperBertForSequenceClassification, batches: list[dict], reference: torch.Tensor,
                 regression: bool) -> list[float]:
    """How much the full model's outputs move when each layer alone is skipped (forward passes
    only): KL from the full model's class distribution, or the mean squared change of a regression
    score. A layer that moves them most is kept longest by the ``importance`` depth order."""
    config, largest = model.config, model.config.search_space.largest()
    total = largest.num_hidden_layers
    previous = config.depth_layers
    scores = []
    try:
        for skipped in range(total):
            config.depth_layers = {**(previous or {}), str(total - 1): [i for i in range(total) if i != skipped]}
            model.set_arch(dataclasses.replace(largest, num_hidden_layers=total - 1))
            logits = logits_of(model, batches)
            if regression:
                scores.append(float(F.mse_loss(logits, reference)))
            else:
                scores.append(float(F.kl_div(logits.log_softmax(-1), reference.log_softmax(-1), log_target=True,
                                             reduction="batchmean")))
    finally:
        config.depth_layers = previous
        model.set_arch(None)
    return scores


def task_superplm_from_source(source_dir: str | Path, task, tokenizer, train_features: list[dict],
                              settings: TaskSuperPLMSettings, trust_remote_code: bool = False,
                              ) -> tuple[SuperBertForSequenceClassification, dict[str, Any]]:
    """(task SuperPLM, summary): the fine-tuned source at ``source_dir``, importance-ordered on its
    own training rows, with the configured depth order; its largest sub-model equals the source."""
    source = load_finetuned_source(source_dir, task, trust_remote_code)
    shape = importance.Shape.of(source.config)
    batches = calibration_batches(train_features, finetune.padding_id(tokenizer), settings.calibration_examples,
                                  settings.seed)
    if settings.importance == "activation":
        orders = importance.activation_scores(source, batches, shape).orders(settings.mode)
    elif settings.importance == "weight":
        orders = importance.weight_scores(source.state_dict(), shape).orders(settings.mode)
    else:
        orders = importance.Orders()
    model = build(source, settings.mode, orders, settings.seed)
    reference = logits_of(source, batches)
    diff = float((logits_of(model, batches) - reference).abs().max())
    if diff > MAX_DIFF:
        raise RuntimeError(f"the task SuperPLM's largest sub-model differs from the source by {diff:.3g}")
    scores = None
    if settings.depth_order == "importance":
        scores = layer_scores(model, batches, reference, source.config.num_labels == 1)
    layers = model.config.search_space.layers
    model.config.depth_order = settings.depth_order
    model.config.depth_layers = depth_layers(settings.depth_order, shape.layers, layers.values(), scores)
    summary = {"source": str(source_dir), "task": task.name, "mode": settings.mode, "importance": settings.importance,
               "depth_order": settings.depth_order, "depth_layers": model.config.depth_layers,
               "layer_scores": scores, "calibration_rows": sum(len(b["input_ids"]) for b in batches),
               "largest": str(model.config.search_space.largest()), "max_abs_diff": diff}
    model.config.init_from = {k: summary[k] for k in ("source", "task", "mode", "importance", "depth_order")}
    return model, summary


# --- training on the task ---------------------------------------------------------------------------
def sandwich(space: SearchSpace, random_sub_models: int, rng: random.Random) -> list[Arch]:
    """The sub-models of one step: the largest, the smallest and ``random_sub_models`` random ones."""
    return [space.largest(), space.smallest(), *(space.sample(rng) for _ in range(random_sub_models))]


def _step_archs(space: SearchSpace, settings: TaskSuperPLMSettings, seed: int, step: int) -> list[Arch]:
    return sandwich(space, settings.random_sub_models, random.Random(seed * 1_000_003 + step))


def train(model: SuperBertForSequenceClassification, tokenizer, task, data: finetune.TaskData,
          teacher: finetune.TeacherLogits, ft: FinetuneSettings, settings: TaskSuperPLMSettings,
          out: str | Path) -> dict[str, Any]:
    """Train every sub-model on the task (module docstring); checkpoints in ``out/checkpoint``,
    continued when present. Returns the run's summary; the model ends at its largest arch."""
    features = finetune.train_features(task, tokenizer, data.train, ft)
    if len(teacher) != len(features):
        raise ValueError(f"teacher logits cover {len(teacher)} rows, the training data has {len(features)}")
    per_epoch, total, _ = finetune.plan_steps(len(features), ft)
    schedule = training.Schedule(ft.learning_rate, total, ft.warmup_ratio)
    model.to(ft.device)
    optimizer = training.adamw(model, ft.learning_rate, ft.weight_decay)
    checkpoint, space, pad_id = Path(out) / CHECKPOINT_DIR, model.config.search_space, finetune.padding_id(tokenizer)
    step, seconds, losses = 0, 0.0, []
    stop = training.StopOnSigterm("task SuperPLM training")
    with torch.random.fork_rng(devices=[]), stop:
        torch.manual_seed(ft.seed)  # dropout stream of this run only
        if training.has_checkpoint(checkpoint):
            saved, tensors = training.load_checkpoint(checkpoint, model, optimizer)
            torch.set_rng_state(tensors["rng_state"])
            step, seconds, losses = saved["step"], saved["seconds"], saved["losses"]
        model.train()
        bar = training.progress_bar(total, step, f"{task.name} task SuperPLM", ft.progress)
        started = time.perf_counter()
        while step < total:
            epoch, position = divmod(step, per_epoch)
            rows = finetune.epoch_order(features, ft, epoch)[position * ft.batch_size:(position + 1) * ft.batch_size]
            batch = {k: v.to(ft.device) for k, v in finetune.collate([features[i] for i in rows], pad_id).items()}
            targets = teacher.rows(rows, ft.device)
            loss = 0.0
            for arch in _step_archs(space, settings, ft.seed, step):
                model.set_arch(arch)
                sub_loss = finetune.task_loss(task, finetune.head_outputs(model, batch), batch, targets, ft)
                sub_loss.backward()  # gradients of the sub-models add up in the shared weights
                loss += float(sub_loss.detach())
            schedule.apply(optimizer, step)
            training.clip_and_step(optimizer, model.parameters(), ft.max_grad_norm)
            step += 1
            losses.append(round(loss, 5))
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if step % settings.save_every == 0 or step == total or stop.requested:
                seconds += time.perf_counter() - started
                started = time.perf_counter()
                training.save_checkpoint(checkpoint, model, optimizer, {"step": step, "seconds": seconds,
                                                                        "losses": losses},
                                         tensors={"rng_state": torch.get_rng_state()})
            if stop.requested and step < total:
                bar.close()
                raise stop.preempted(step)
        bar.close()
    model.set_arch(None)
    model.eval()
    return {"steps": total, "train_seconds": round(seconds, 1), "sub_models_per_step": 2 + settings.random_sub_models,
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None}
