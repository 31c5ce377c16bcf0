"""One-shot SuperPLM pre-training (AutoTinyBERT §3.2) and further training of one architecture.

This module is the loop (`pretrain`: set-up, steps, logging, validation and checkpoint cadence,
the summary); each other concept is a module of this package: `sampling` (seeds, the sub-models
each step trains, the validation panel), `teachers` (what KD distills from), `objectives` (the
MLM / KD losses and their global-batch shares), `batches` (data order and masking), `validation`,
`checkpoints` (resume, ``--init``, weights digest), `metrics` (metrics.csv and TensorBoard) and
`vocabulary` (the run's tokenizer). Their names are importable from here too.

* Determinism: every random choice of step ``s`` is derived from ``(seed, s, ...)``: the
  architectures from ``(seed, s, worker)``, the data order from ``(seed, epoch)``, the masks of a
  sequence from ``(seed, s, its row in the corpus)``, dropout from ``(seed, s, worker,
  micro-batch, sub-model)``. A run killed and resumed from its last checkpoint therefore replays
  exactly the steps it lost, and ends with the same weights.
* N processes = 1 process: a step trains one *global* batch of ``batch_size x workers x
  grad_accum`` rows of the epoch's permutation, however it is split over workers and
  micro-batches; masks depend on the row, not on where it lands; every loss term is a sum over
  the global batch divided by the global count (masked tokens, tokens, attention pairs), so
  gradients summed over workers equal one process's. With ``random`` sampling (same archs
  everywhere) and dropout off, 2 processes x batch B/2 give the weights of 1 process x batch B up
  to float rounding; dropout masks are drawn per worker tensor, so with dropout they agree in
  distribution only. Gradients are all-reduced by hand (`training.all_reduce_gradients` says
  why not DDP), keeping unused parameters' gradients None, as in one process.
* Files (crash-safe at any instant, see `training.py` and `files.py`): ``out/checkpoint``
  (resume), ``out/config.json`` + ``out/model.safetensors`` (the SuperPLM, refreshed at each
  checkpoint), ``out/metrics.csv``, ``out/results.json``, ``out/exported`` (``--arch`` runs).
  SIGTERM saves a checkpoint at the next step boundary and raises `Preempted`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..data import PackedSplit, build_dataset
from ..errors import UserError
from ..files import RunDirectory, atomic_write_json, staged_directory
from ..modeling import SuperBertConfig, SuperBertForPreTraining, new_supernet
from ..settings import OBJECTIVES, SAMPLING_RULES, PretrainSettings  # noqa: F401 - re-exported
from ..space import Arch, SearchSpace
from ..training import (MetricsLog, Schedule, StopOnSigterm, Workers, adamw, all_reduce_gradients, clip_and_step,
                        init_workers, parameter_groups, progress_bar)
# The loop calls what it needs through this module's globals (patching `autotinybert.pretrain.NAME`
# reaches it); the other names are re-exported for callers of the one-module API.
from .batches import batch_indices, masked_batch, row_generators
from .checkpoints import (CHECKPOINT_DIR, _RESUME_INVARIANT, inherited_config, initial_weights,  # noqa: F401
                          load_checkpoint, save_checkpoint, weights_digest)
from .metrics import METRIC_FIELDS, METRICS_FILE, TensorBoard
from .objectives import kd_loss, layer_map, loss_shares, mapped_hidden_loss, step_loss  # noqa: F401
from .sampling import ArchSampler, derive_seed, point_space, resolve_space, validation_panel  # noqa: F401
from .teachers import InPlaceTargets, RecordedTeacher, Teacher  # noqa: F401
from .validation import evaluate, validation_batches, validation_row  # noqa: F401
from .vocabulary import prepare_tokenizer, save_tokenizer

__all__ = ["PretrainSettings", "pretrain", "ArchSampler", "Teacher", "step_loss", "kd_loss", "Workers", "init_workers",
           "all_reduce_gradients", "parameter_groups", "save_checkpoint", "load_checkpoint", "weights_digest"]


@dataclass
class _Run:
    """Everything one pre-training run holds between steps."""

    settings: PretrainSettings
    workers: Workers
    out: Path
    space: SearchSpace
    tokenizer: Any
    teacher: Teacher | None
    train: PackedSplit
    valid: PackedSplit
    cache_entry: Path
    model: SuperBertForPreTraining
    optimizer: torch.optim.Optimizer
    start: int
    sampler: ArchSampler = field(init=False)
    schedule: Schedule = field(init=False)
    parameters: list = field(init=False)
    metrics: MetricsLog = field(init=False)
    board: TensorBoard = field(init=False)
    autocast: Any = field(init=False)
    publish: Callable[[], None] = lambda: None  # swaps a finished --overwrite run into --out
    progress: Any = None
    tokens_seen: int = 0
    started: float = field(default_factory=time.perf_counter)
    last_eval: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        s = self.settings
        self.sampler = ArchSampler(self.space, "random" if s.arch else s.sampling, s.samples_per_batch, s.seed)
        self.schedule = Schedule(s.lr, s.max_steps, s.warmup_ratio)
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.metrics = MetricsLog(self.out / METRICS_FILE, METRIC_FIELDS)
        self.board = TensorBoard(self.out, self.workers.main)
        self.autocast = torch.autocast(self.workers.device.type, dtype=torch.bfloat16, enabled=s.bf16)

    def tokens_per_second(self) -> int:
        return int(self.tokens_seen / max(time.perf_counter() - self.started, 1e-9)) * self.workers.world


def _plan_out(settings: PretrainSettings, resume: bool, overwrite: bool) -> RunDirectory:
    """Where the run writes (the rules of `files.RunDirectory`; a run writes config.yaml first).
    Only reads the file system: nothing is created before every input has been loaded."""
    return RunDirectory.plan(settings.out, resume=resume, overwrite=overwrite)


def _load_data(settings: PretrainSettings, tokenizer, cache_dir: Path, workers: Workers):
    def build():
        return build_dataset(settings.corpus, tokenizer, settings.seq_len, cache_dir, settings.valid_corpus,
                             text_column=settings.text_column)

    if workers.main:  # one process tokenises; the others read the cache it writes
        data = build()
    workers.barrier()
    return data if workers.main else build()


def _build_model(settings: PretrainSettings, space: SearchSpace, tokenizer, teacher: Teacher | None,
                 workers: Workers) -> SuperBertForPreTraining:
    inherited = inherited_config(settings)
    config = SuperBertConfig.from_space(
        space, vocab_size=len(tokenizer),
        max_position_embeddings=max(inherited.pop("max_position_embeddings", 512), settings.seq_len),
        teacher_hidden_size=teacher.config.hidden_size if teacher else None,
        pad_token_id=tokenizer.pad_token_id, **inherited,
    )
    model = new_supernet(config, settings.seed)
    if settings.init:
        initial_weights(model, settings)
    return model.to(workers.device).train()


def _start(settings: PretrainSettings, workers: Workers, resume: bool, overwrite: bool) -> _Run:
    run_dir = _plan_out(settings, resume, overwrite)
    resume, out = run_dir.resume, run_dir.work
    space = resolve_space(settings)
    cache_dir = Path(settings.cache_dir or Path.home() / ".cache" / "autotinybert" / "data")
    tokenizer = prepare_tokenizer(settings, out, workers, resume, cache_dir)
    teacher = Teacher(settings.teacher, workers.device, settings.trust_remote_code) \
        if settings.objective in ("kd", "both") else None
    if teacher is not None:
        teacher.check_fits(space, len(tokenizer))
    train, valid, cache_entry = _load_data(settings, tokenizer, cache_dir, workers)
    model = _build_model(settings, space, tokenizer, teacher, workers)
    optimizer = adamw(model, settings.lr, settings.weight_decay)
    start = load_checkpoint(out, model, optimizer, settings) if resume else 0
    if workers.main:  # every input loaded: now the run folder may be made, config.yaml first
        run_dir.create({**asdict(settings), "resume": resume})
    workers.barrier()
    run = _Run(settings, workers, out, space, tokenizer, teacher, train, valid, cache_entry, model, optimizer, start,
               publish=run_dir.publish)
    if workers.main:
        run.metrics.trim(start)
        save_tokenizer(tokenizer, out)
    return run


def pretrain(settings: PretrainSettings, resume: bool = False,
             on_step: Callable[[int], None] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Run (or resume) pre-training; returns the final summary also written to ``results.json``.

    ``resume``: continue from ``out/checkpoint``, or start at step 0 when there is none yet (the
    resume rule of training.py). ``overwrite``: replace a non-empty ``out`` once the new run is
    complete (`files.RunDirectory`). ``on_step(step)`` is called after every optimiser step
    (progress hooks, tests). SIGTERM stops at the next step boundary with a checkpoint: `Preempted`.
    """
    settings.check()
    workers = init_workers()
    run = _start(settings, workers, resume, overwrite)
    run.progress = progress_bar(settings.max_steps, run.start, "pretrain", settings.progress and workers.main)
    # Dropout draws from torch's global generator: forked here so the caller's state is untouched,
    # and re-seeded per micro-batch so a resumed run replays the lost steps exactly.
    devices = [workers.device.index or 0] if workers.device.type == "cuda" else []
    try:
        with StopOnSigterm("pretrain") as stop, torch.random.fork_rng(devices=devices):
            for step in range(run.start, settings.max_steps):
                archs, losses, stopping = _train_step(run, step, stop)
                _after_step(run, step + 1, archs, losses, stopping, stop)
                if on_step is not None:
                    on_step(step + 1)
    finally:
        run.progress.close()
    return _finish(run)


def _micro_batch(run: _Run, step: int, micro: int) -> dict[str, torch.Tensor]:
    s = run.settings
    rows = batch_indices(len(run.train), s.batch_size, run.workers, s.seed, step, micro, s.grad_accum)
    return masked_batch(run.train, rows, run.tokenizer, row_generators(s.seed, step, rows, 1), run.workers.device)


def _train_step(run: _Run, step: int, stop: StopOnSigterm) -> tuple[list[Arch], dict[str, float], bool]:
    """One optimiser step over the global batch; returns (archs, global mean losses, stop agreed)."""
    s, workers = run.settings, run.workers
    archs = run.sampler.archs(step, workers.rank)
    batches = [_micro_batch(run, step, micro) for micro in range(s.grad_accum)]
    losses: dict[str, float] = {"loss": 0.0}
    for micro, (batch, shares) in enumerate(zip(batches, loss_shares(batches, workers))):
        run.tokens_seen += int(batch["attention_mask"].sum()) * len(archs)
        # Sandwich order: archs[0] is the largest; with in-place distillation it teaches the rest.
        in_place = s.distill_from == "largest"
        targets = InPlaceTargets(run.model, archs[0], batch, s.kd_layers) if in_place else None
        for index, arch in enumerate(archs):
            torch.manual_seed(derive_seed(s.seed, step, workers.rank, micro, index, 2))
            run.model.set_arch(arch)
            teacher = targets if targets is not None and index > 0 else run.teacher
            with run.autocast:
                loss, parts = step_loss(run.model, batch, s.objective, teacher, shares, s.kd_layers)
            if loss.requires_grad:
                (loss / len(archs)).backward()
            for key, value in {"loss": loss.item(), **parts}.items():
                losses[key] = losses.get(key, 0.0) + value / len(archs)
    # One all-reduce: the global losses (each worker holds its share) and whether any worker got SIGTERM,
    # so that every worker stops at the same step.
    keys = sorted(losses)
    totals = workers.sum([losses[k] for k in keys] + [float(stop.requested)])
    losses = dict(zip(keys, totals[:-1]))
    _check_finite(losses["loss"], step, run.out)
    all_reduce_gradients(run.parameters, workers)
    run.schedule.apply(run.optimizer, step)
    clip_and_step(run.optimizer, run.parameters, s.max_grad_norm)
    return archs, losses, totals[-1] > 0


def _after_step(run: _Run, done: int, archs: list[Arch], losses: dict[str, float], stopping: bool,
                stop: StopOnSigterm) -> None:
    """Progress, logging, validation, checkpoint; SIGTERM ends the run here (`Preempted`)."""
    s, workers = run.settings, run.workers
    last = done == s.max_steps
    run.progress.update(1)
    run.progress.set_postfix(loss=f"{losses['loss']:.3f}", tok_s=run.tokens_per_second(), arch=str(archs[0]))
    if workers.main and (done % s.log_every == 0 or last):
        rows = [{"step": done, "split": "train", "arch": " ".join(map(str, archs)),
                 **{k: round(v, 5) for k, v in losses.items()}, "lr": run.schedule.lr(done - 1),
                 "tokens_per_s": run.tokens_per_second()}]
        run.metrics.append(rows)
        run.board.log(rows)
    if done % s.eval_every == 0 or last:
        if workers.main:
            _validate(run, done)
        workers.barrier()
    if done % s.save_every == 0 or last or stopping:
        if workers.main:
            save_checkpoint(run.out, run.model, run.optimizer, run.schedule, done, run.tokenizer, s)
        workers.barrier()
    if stopping and not last:
        raise stop.preempted(done)


def _validate(run: _Run, done: int | None) -> None:
    s = run.settings
    run.last_eval = evaluate(run.model, run.valid, run.tokenizer, validation_panel(run.space), s.objective,
                             run.teacher, s.batch_size, s.eval_batches, s.seed, run.workers.device)
    if done is not None:
        rows = [{"step": done, "split": "valid", "arch": arch, **row} for arch, row in run.last_eval.items()]
        run.metrics.append(rows)
        run.board.log(rows)


def _finish(run: _Run) -> dict[str, Any]:
    s, workers = run.settings, run.workers
    if workers.main and not run.last_eval:
        _validate(run, None)  # resumed after the final checkpoint: its rows are logged already
    summary = {
        "steps": s.max_steps,
        "resumed_from": run.start,
        "space": run.space.to_dict(),
        "validation": run.last_eval,
        "wall_seconds": round(time.perf_counter() - run.started, 2),
        "tokens_per_second": run.tokens_per_second(),
        "workers": workers.world,
        "weights_digest": weights_digest(run.model),
        "data_cache": str(run.cache_entry),
        "train_sequences": len(run.train),
        "valid_sequences": len(run.valid),
    }
    if workers.main:
        if s.arch:
            _export_fixed(run.model, Arch.parse(s.arch), run.out, run.tokenizer)
            summary["exported"] = str(Path(s.out) / "exported")
        atomic_write_json(run.out / "results.json", summary)
        run.publish()
    workers.barrier()
    return summary


def _check_finite(loss: float, step: int, out: Path) -> None:
    if not math.isfinite(loss):
        raise UserError(f"the loss became {loss} at step {step + 1}; nothing was saved from this step. "
                        f"Lower --lr (or use --bf16 off) and continue from the last checkpoint in {out} with --resume")


def _export_fixed(model: SuperBertForPreTraining, arch: Arch, out: Path, tokenizer) -> None:
    """Further training ends with an ordinary Hugging Face checkpoint of the trained architecture."""
    from ..export import extract, save_export

    with staged_directory(out / "exported", overwrite=True) as tmp:
        save_export(extract(model.cpu(), arch), tmp, tokenizer)
