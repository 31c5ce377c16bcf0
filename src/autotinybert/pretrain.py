"""One-shot SuperPLM pre-training (AutoTinyBERT §3.2) and further training of one architecture.

* Sampling (`ArchSampler`): ``random`` draws one sub-model per step, the same on every worker
  (official behaviour); ``per-worker`` lets each process draw its own; ``sandwich`` trains the
  largest, the smallest and ``k`` random sub-models each step. ``--samples-per-batch`` sums the
  gradients of several draws (official ``sample_times_per_batch``).
* Objectives: ``mlm`` (AutoTinyBERT-MLM), ``kd`` (AutoTinyBERT-KD: MSE between the last layer's
  pre-softmax attention scores of student and teacher + MSE between the fit layer applied to the
  student's last hidden state and the teacher's), or ``both`` (their sum). ``--kd-layers mapped``
  adds every other layer against teacher layer round(i·L_t/L); ``--distill-from largest`` makes a
  sandwich step's largest sub-model the KD target of the others (in-place distillation).
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

import functools
import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from . import training
from .checkpoint import checkpoint_config, load_pretrained, load_supernet, load_tokenizer, publish_supernet
from .data import (
    IGNORE_INDEX,
    PackedSplit,
    build_dataset,
    corpus_files,
    corpus_fingerprint,
    make_batch,
    mask_tokens,
    train_wordpiece,
)
from .errors import UserError
from .files import RunDirectory, atomic_write_json, fsync_path, staged_directory
from .modeling import SuperBertConfig, SuperBertForPreTraining, new_supernet
from .options import resume_invariant
from .settings import OBJECTIVES, SAMPLING_RULES, PretrainSettings  # noqa: F401 - re-exported
from .space import RELEASED, Arch, Dim, SearchSpace
from .training import (MetricsLog, Schedule, StopOnSigterm, Workers, adamw, all_reduce_gradients, clip_and_step,
                       init_workers, parameter_groups, progress_bar)

# Changing these between a run and its --resume would silently change what is trained: every
# option not declared ``resume="free"`` (progress, logging, the step budget, paths).
_RESUME_INVARIANT = resume_invariant(PretrainSettings)
__all__ = ["PretrainSettings", "pretrain", "ArchSampler", "Teacher", "step_loss", "kd_loss", "Workers", "init_workers",
           "all_reduce_gradients", "parameter_groups", "save_checkpoint", "load_checkpoint", "weights_digest"]


# --- seeds ------------------------------------------------------------------------------------
def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers: independent streams per (seed, step, worker, micro-batch)."""
    digest = hashlib.sha256(",".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# --- sampling ---------------------------------------------------------------------------------
@dataclass
class ArchSampler:
    space: SearchSpace
    rule: str = "random"
    samples_per_batch: int = 1
    seed: int = 0

    def archs(self, step: int, rank: int) -> list[Arch]:
        """Architectures trained at ``step`` by worker ``rank`` (gradients summed over them)."""
        worker = rank if self.rule == "per-worker" else 0
        rng = random.Random(derive_seed(self.seed, step, worker, 17))
        draws = [self.space.sample(rng) for _ in range(self.samples_per_batch)]
        if self.rule == "sandwich":
            return [self.space.largest(), self.space.smallest(), *draws]
        return draws


def point_space(arch: Arch) -> SearchSpace:
    """A space holding only ``arch``: further training of one architecture reuses the SuperPLM code.

    The kd form keeps every head and trims nothing, so any head width works.
    """
    def only(value: int) -> Dim:
        return Dim(value, value, 1)

    return SearchSpace(mode="kd", layers=only(arch.num_hidden_layers), hidden=only(arch.hidden_size),
                       ffn=only(arch.intermediate_size), heads=only(arch.num_attention_heads),
                       qkv=Dim(arch.qkv_size, arch.qkv_size, arch.num_attention_heads))


def validation_panel(space: SearchSpace) -> list[Arch]:
    """Smallest, largest, a middle one and the released architectures that fit the space."""
    panel = [space.smallest(), _middle(space), space.largest()]
    panel += [item.arch for item in RELEASED if item.mode == space.mode and space.contains(item.arch)]
    return list(dict.fromkeys(panel))


def _middle(space: SearchSpace) -> Arch:
    layers = space.layers.snap((space.layers.min + space.layers.max) // 2)
    hidden = space.hidden.snap((space.hidden.min + space.hidden.max) // 2)
    ffn = space.ffn.snap((space.ffn.min + space.ffn.max) // 2)
    if space.mode == "mlm":
        heads = space.heads.snap((space.heads.min + space.heads.max) // 2)
        return Arch(layers, hidden, ffn, heads, heads * space.head_size)
    qkv = space.qkv.snap((space.qkv.min + space.qkv.max) // 2)
    return Arch(layers, hidden, ffn, space.heads.min, qkv)


# --- teacher and objectives -----------------------------------------------------------------
class Teacher:
    """A frozen BERT-family encoder giving last-layer hidden states and pre-softmax attention scores."""

    def __init__(self, path: str | Path, device: torch.device, trust_remote_code: bool = False) -> None:
        from transformers import AutoModel

        from .builtin_data import resolve_model

        path = Path(resolve_model(str(path)))  # builtin:all-minilm-l6-v2 names the packaged model
        self.model = load_pretrained(AutoModel, path, "--teacher", trust_remote_code).to(device).eval()
        self.config = self.model.config
        self.path = path
        self._query_key_input: torch.Tensor | None = None
        last = self.model.encoder.layer[-1].attention.self
        # The scores are recomputed from the last layer's input: HF models return only probabilities.
        last.register_forward_pre_hook(self._capture, with_kwargs=True)
        self._last = last

    def _capture(self, module, args, kwargs) -> None:
        self._query_key_input = args[0] if args else kwargs["hidden_states"]

    def check_fits(self, space: SearchSpace, vocab_size: int) -> None:
        heads = self.config.num_attention_heads
        if space.mode != "kd" or space.heads.min != heads:
            raise UserError(
                f"the teacher has {heads} heads but the space {'is an mlm space' if space.mode == 'mlm' else f'fixes {space.heads.min} heads'}; "
                f"KD matches attention head by head: use a kd space with heads {heads} (e.g. --space paper-kd)"
            )
        if self.config.vocab_size != vocab_size:
            raise UserError(f"the teacher's vocabulary has {self.config.vocab_size} tokens but the student's "
                            f"tokenizer has {vocab_size}; use the teacher's tokenizer (--tokenizer {self.path})")

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(last hidden state, last layer's attention scores); `layers` holds every layer's hidden state."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        hidden, self.layers = out.last_hidden_state, out.hidden_states[1:]
        x = self._query_key_input
        batch, seq_len, _ = x.shape
        heads = self.config.num_attention_heads
        query = self._last.query(x).view(batch, seq_len, heads, -1).transpose(1, 2)  # (B, H, T, d)
        key = self._last.key(x).view(batch, seq_len, heads, -1).transpose(1, 2)
        scores = query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1])  # (B, H, T, T)
        return hidden, scores


class InPlaceTargets:
    """In-place distillation's teacher (BigNAS): the KD targets of one batch from the step's largest
    sub-model, computed once without gradient and dropout, in the teacher's shape (the fit layer's
    output and the last layer's attention scores), for every smaller sub-model of the step."""

    def __init__(self, model: SuperBertForPreTraining, largest: Arch, batch: dict[str, torch.Tensor],
                 kd_layers: str = "last") -> None:
        training = model.training
        model.set_arch(largest)
        model.eval()
        mapped = kd_layers == "mapped"  # every layer's target is needed only by the layer-mapped term
        with torch.no_grad():
            out = model(batch["original_ids"], batch["attention_mask"], output_hidden_states=mapped,
                        output_attention_scores=True, compute_logits=False)
            self.layers = tuple(model.fit(h) for h in out.hidden_states[1:]) if mapped else ()  # as `Teacher.layers`
        model.train(training)
        self.hidden, self.scores = out.fit_hidden_state.detach(), out.attention_scores.detach()

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.hidden, self.scores


class RecordedTeacher:
    """A frozen teacher's outputs on fixed batches, computed once. Validation and the search's proxy
    score every architecture on the same batches, so the teacher's forward pass (as costly as the
    source model itself) would otherwise be repeated for each candidate. Called with a batch's
    ``original_ids`` it returns what the teacher returned for that batch; `layers` follows suit."""

    def __init__(self, teacher: Teacher, batches: Sequence[dict[str, torch.Tensor]]) -> None:
        self._outputs: dict[int, tuple] = {}
        self._batches = list(batches)  # kept alive: their ids are the keys
        for batch in self._batches:
            hidden, scores = teacher(batch["original_ids"], batch["attention_mask"])
            self._outputs[id(batch["original_ids"])] = (hidden, scores, teacher.layers)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, scores, self.layers = self._outputs[id(input_ids)]
        return hidden, scores


def kd_loss(student_scores: torch.Tensor, teacher_scores: torch.Tensor, student_fit: torch.Tensor,
            teacher_hidden: torch.Tensor, attention_mask: torch.Tensor,
            shares: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
    """AutoTinyBERT-KD: attention-score MSE + hidden-state MSE, over real (unpadded) tokens only.

    ``shares`` weight the two means by this batch's share of the global (attention pairs, tokens)
    counts, so summing over micro-batches and workers gives the mean over the global batch.
    """
    keep = attention_mask.bool()                                   # (B, T)
    pairs = (keep[:, None, :, None] & keep[:, None, None, :]).expand_as(student_scores)  # (B, H, T, T)
    attention = F.mse_loss(student_scores[pairs], teacher_scores[pairs])
    hidden = F.mse_loss(student_fit[keep], teacher_hidden[keep])
    return attention * shares[0] + hidden * shares[1]


def step_loss(model: SuperBertForPreTraining, batch: dict[str, torch.Tensor], objective: str,
              teacher: Teacher | InPlaceTargets | None, shares: dict[str, float] | None = None,
              kd_layers: str = "last") -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of the active sub-model on one batch, with its parts for logging.

    MLM reads the masked ids; KD reads the original text, as the teacher does. ``shares``
    (`loss_shares`) turn this batch's means into its part of the global batch's means; without
    them the loss is this batch's own mean (validation).
    """
    shares = shares or {}
    parts: dict[str, float] = {}
    loss = torch.zeros((), device=batch["input_ids"].device)
    if objective in ("mlm", "both"):
        out = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
        mlm = out.loss * shares.get("mlm", 1.0)
        loss = loss + mlm
        parts["mlm_loss"] = mlm.item()
    if objective in ("kd", "both"):
        hidden, scores = teacher(batch["original_ids"], batch["attention_mask"])
        student = model(batch["original_ids"], batch["attention_mask"], output_attention_scores=True,
                        output_hidden_states=kd_layers == "mapped", compute_logits=False)
        distill = kd_loss(student.attention_scores.float(), scores.float(), student.fit_hidden_state.float(),
                          hidden.float(), batch["attention_mask"], (shares.get("pairs", 1.0), shares.get("tokens", 1.0)))
        parts["kd_loss"] = distill.item()
        if kd_layers == "mapped":
            mapped = mapped_hidden_loss([model.fit(h) for h in student.hidden_states[1:]], teacher.layers,
                                        batch["attention_mask"]) * shares.get("tokens", 1.0)
            distill = distill + mapped
            parts["kd_mapped_loss"] = mapped.item()
        loss = loss + distill
    return loss, parts


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Teacher layer (1-based) each student layer 1..L learns from: round(i * L_teacher / L), so the
    last layer maps onto the last (TinyBERT's uniform map)."""
    return [max(1, round(i * teacher_layers / student_layers)) for i in range(1, student_layers + 1)]


def mapped_hidden_loss(student_fit: list[torch.Tensor], teacher_layers: Sequence[torch.Tensor],
                       attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean hidden-state MSE of every student layer but the last (the paper's term has that one)
    against its mapped teacher layer, over real tokens; zero for a one-layer student."""
    keep = attention_mask.bool()
    pairs = list(zip(student_fit, layer_map(len(student_fit), len(teacher_layers))))[:-1]
    if not pairs:
        return student_fit[-1].new_zeros(())
    return sum(F.mse_loss(s[keep].float(), teacher_layers[t - 1][keep].float()) for s, t in pairs) / len(pairs)


def loss_shares(batches: list[dict[str, torch.Tensor]], workers: Workers) -> list[dict[str, float]]:
    """Each micro-batch's share of the step's global counts (masked tokens, tokens, attention pairs).

    One all-reduce of three numbers per step. With one worker and one micro-batch every share is
    exactly 1.0, so the loss is bit-for-bit the batch mean.
    """
    counts = []
    for batch in batches:
        lengths = batch["attention_mask"].sum(1).double()
        counts.append([float((batch["labels"] != IGNORE_INDEX).sum()), float(lengths.sum()), float((lengths ** 2).sum())])
    totals = workers.sum([sum(column) for column in zip(*counts)])
    return [{key: (c / t if t else 0.0) for key, c, t in zip(("mlm", "tokens", "pairs"), row, totals)} for row in counts]


# --- data order -------------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def _epoch_order(num_sequences: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng(derive_seed(seed, epoch, 23)).permutation(num_sequences)


def batch_indices(num_sequences: int, batch_size: int, workers: Workers, seed: int, step: int, micro: int = 0,
                  grad_accum: int = 1) -> np.ndarray:
    """Rows of micro-batch ``micro`` of ``step`` for this worker: a fresh permutation every epoch.

    Step ``s`` trains rows ``s*G .. (s+1)*G`` of its epoch's permutation (``G = batch_size x
    workers x grad_accum``); how they are split over workers and micro-batches does not change
    which rows the step holds.
    """
    per_step = batch_size * workers.world * grad_accum
    per_epoch = num_sequences // per_step
    if per_epoch == 0:
        raise UserError(f"the corpus has {num_sequences} sequences, fewer than one global batch ({per_step}); "
                        "lower --batch-size or add text")
    epoch, within = divmod(step, per_epoch)
    start = within * per_step + (micro * workers.world + workers.rank) * batch_size
    return np.sort(_epoch_order(num_sequences, seed, epoch)[start: start + batch_size])


def masked_batch(split: PackedSplit, indices: np.ndarray, tokenizer, generators: list[torch.Generator],
                 device: torch.device) -> dict[str, torch.Tensor]:
    """A padded batch of rows ``indices``, each masked with its own generator (BERT 80/10/10).

    Per-row generators make a row's masks independent of the batch it lands in (batch width,
    neighbours, worker), which is what lets N workers reproduce one.
    """
    batch = make_batch(split, indices)
    ids, attention = batch["input_ids"], batch["attention_mask"]
    masked, labels = ids.clone(), torch.full_like(ids, IGNORE_INDEX)
    for row, generator in enumerate(generators):
        length = int(attention[row].sum())
        row_masked, row_labels = mask_tokens(ids[row: row + 1, :length], attention[row: row + 1, :length],
                                             tokenizer.all_special_ids, tokenizer.mask_token_id, len(tokenizer),
                                             generator)
        masked[row, :length], labels[row, :length] = row_masked[0], row_labels[0]
    return {"input_ids": masked.to(device), "labels": labels.to(device), "original_ids": ids.to(device),
            "attention_mask": attention.to(device)}


def _row_generators(seed: int, step: int, rows: np.ndarray, stream: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(derive_seed(seed, step, int(row), stream)) for row in rows]


# --- validation -------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: SuperBertForPreTraining, split: PackedSplit, tokenizer, archs: list[Arch], objective: str,
             teacher: Teacher | None, batch_size: int, batches: int, seed: int, device: torch.device) -> dict[str, dict]:
    """Validation MLM loss/accuracy (and KD loss) of each architecture on the same masked batches."""
    if len(split) == 0:
        return {}
    fixed = validation_batches(split, tokenizer, batch_size, batches, seed, device)
    recorded = RecordedTeacher(teacher, fixed) if teacher is not None else None
    return {str(arch): validation_row(model, arch, fixed, recorded) for arch in archs}


def validation_batches(split: PackedSplit, tokenizer, batch_size: int, batches: int, seed: int,
                       device: torch.device) -> list[dict[str, torch.Tensor]]:
    """The fixed masked batches every architecture is scored on (the same masks for all)."""
    fixed = []
    for start in range(0, min(len(split), batch_size * batches), batch_size):
        rows = np.arange(start, min(start + batch_size, len(split)))
        fixed.append(masked_batch(split, rows, tokenizer, _row_generators(seed, -1, rows, 3), device))
    return fixed


def validation_row(model: SuperBertForPreTraining, arch: Arch, fixed: list[dict], teacher: RecordedTeacher | None,
                   mlm: bool = True) -> dict[str, float]:
    """MLM loss / accuracy (``mlm``) and, with a teacher, KD loss of ``arch`` on ``fixed``, in eval mode;
    the model's mode and active architecture are restored."""
    was_training, previous = model.training, model.arch
    model.eval()
    model.set_arch(arch)
    try:
        with torch.no_grad():
            return _validation_row(model, fixed, teacher, mlm)
    finally:
        model.set_arch(previous)
        model.train(was_training)


def _validation_row(model: SuperBertForPreTraining, fixed: list[dict], teacher: RecordedTeacher | None,
                    mlm: bool) -> dict[str, float]:
    total_loss = correct = count = kd_total = 0.0
    for batch in fixed:
        if mlm:
            out = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
            selected = batch["labels"][batch["labels"] != IGNORE_INDEX]
            total_loss += out.loss.item() * len(selected)
            correct += (out.logits.argmax(-1) == selected).sum().item()
            count += len(selected)
        if teacher is not None:
            kd_total += step_loss(model, batch, "kd", teacher)[1]["kd_loss"]
    row = {"mlm_loss": total_loss / max(count, 1), "mlm_accuracy": correct / max(count, 1)} if mlm else {}
    if teacher is not None:
        row["kd_loss"] = kd_total / len(fixed)
    return row


# --- model set-up -----------------------------------------------------------------------------
def resolve_space(settings: PretrainSettings) -> SearchSpace:
    if settings.arch:
        return point_space(Arch.parse(settings.arch))
    return SearchSpace.load(settings.space).with_limits(**settings.space_limits)


def _exported_state(path: Path, trust_remote_code: bool = False) -> dict[str, torch.Tensor]:
    """Weights of an extracted checkpoint under SuperPLM names (the MLM decoder is tied, so dropped)."""
    from transformers import AutoModelForMaskedLM

    model = load_pretrained(AutoModelForMaskedLM, path, "--init", trust_remote_code)
    return {k: v for k, v in model.state_dict().items() if not k.startswith("cls.predictions.decoder")}


def initial_weights(model: SuperBertForPreTraining, settings: PretrainSettings) -> None:
    """``--init``: a SuperPLM (its slice for ``--arch``, else all of it) or an extracted checkpoint."""
    path = Path(settings.init)
    model_type = checkpoint_config(path, "--init").get("model_type")
    if model_type == SuperBertConfig.model_type:
        source = load_supernet(path)
        # One architecture (--arch), or the largest of a space shrunk by --max-* limits: its slice.
        wanted = Arch.parse(settings.arch) if settings.arch else model.config.search_space.largest()
        same = wanted == source.config.search_space.largest()
        state = source.state_dict() if same else source.sliced_state_dict(wanted)
        if not same and source.fit_dense is not None:  # the KD fit layer reads the first d_m features
            state["fit_dense.weight"] = source.fit_dense.weight[:, : wanted.hidden_size].detach().clone()
            state["fit_dense.bias"] = source.fit_dense.bias.detach().clone()
        state = {k: v for k, v in state.items() if not k.startswith("cls.predictions.decoder")}
    else:
        state = _exported_state(path, settings.trust_remote_code)
    expected = model.state_dict()
    wrong = [k for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        raise UserError(f"--init {path}: {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, the model needs "
                        f"{tuple(expected[wrong[0]].shape)}; the checkpoint holds another architecture or vocabulary")
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)


# --- checkpoints ------------------------------------------------------------------------------
CHECKPOINT_DIR = "checkpoint"
METRICS_FILE = "metrics.csv"
METRIC_FIELDS = ("step", "split", "arch", "loss", "mlm_loss", "mlm_accuracy", "kd_loss", "lr", "tokens_per_s")


def save_checkpoint(out: Path, model, optimizer, schedule: Schedule, step: int, tokenizer,
                    settings: PretrainSettings) -> None:
    """Refresh the SuperPLM files in ``out`` (so ``autotinybert extract --supernet out`` works
    mid-training), then commit ``out/checkpoint`` (weights + optimizer + step + settings).

    This order keeps every kill harmless: killed before the commit, the run resumes from the
    previous checkpoint and rewrites the same SuperPLM files when it passes this step again.
    """
    publish_supernet(model, out)
    training.save_checkpoint(out / CHECKPOINT_DIR, model, optimizer,
                             {"step": step, "workers": _world(), "settings": asdict(settings)})


def _world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_available() and torch.distributed.is_initialized() else 1


def load_checkpoint(out: Path, model, optimizer, settings: PretrainSettings) -> int:
    """Restore a run from ``out/checkpoint``; returns the step to continue from (0: none yet)."""
    ckpt = out / CHECKPOINT_DIR
    if not training.has_checkpoint(ckpt):
        return 0

    def same_run(state: dict) -> None:
        saved = state.get("settings", {})
        changed = [k for k in _RESUME_INVARIANT if k in saved and saved[k] != asdict(settings)[k]]
        if state.get("workers", 1) != _world():
            changed.append(f"number of workers ({state.get('workers', 1)} then, {_world()} now)")
        if changed:
            raise UserError(f"--resume with different {', '.join(changed)} than the checkpoint; "
                            "rerun with the original arguments (only --max-steps and logging may change)")

    state, _ = training.load_checkpoint(ckpt, model, optimizer, check=same_run)
    return int(state["step"])


class TensorBoard:
    """Scalars to ``out/tensorboard`` when the optional tensorboard package is installed."""

    def __init__(self, out: Path, enabled: bool) -> None:
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # optional: pip install 'autotinybert[tensorboard]'
                return
            self.writer = SummaryWriter(str(out / "tensorboard"))

    def log(self, rows: list[dict]) -> None:
        if self.writer is None:
            return
        for row in rows:
            prefix = row["split"] if row["split"] == "train" else f"valid/{row['arch']}"
            for key in ("loss", "mlm_loss", "mlm_accuracy", "kd_loss", "lr", "tokens_per_s"):
                if row.get(key) not in (None, ""):
                    self.writer.add_scalar(f"{prefix}/{key}", float(row[key]), int(row["step"]))
        self.writer.flush()


# --- the run ----------------------------------------------------------------------------------
def _prepare_tokenizer(settings: PretrainSettings, out: Path, workers: Workers, resume: bool, cache_dir: Path):
    if resume and (out / "tokenizer_config.json").is_file():
        return load_tokenizer(out)
    if settings.tokenizer:
        tokenizer = load_tokenizer(settings.tokenizer)
        if settings.vocab_size is not None and settings.vocab_size != len(tokenizer):
            raise UserError(f"--vocab-size {settings.vocab_size} contradicts the tokenizer's {len(tokenizer)} tokens")
        return tokenizer
    if settings.init and any((Path(settings.init) / f).is_file() for f in ("tokenizer.json", "vocab.txt")):
        return load_tokenizer(settings.init, "--init")
    if settings.vocab_size is None:
        raise UserError("give --tokenizer DIR (e.g. the teacher's) or --vocab-size N to train a WordPiece vocabulary")
    # The tokenizers library breaks frequency ties in hash order, so two trainings on the same text
    # can differ. Caching the vocabulary by (corpus, size) makes reruns see the very same one.
    files = corpus_files([c for c in settings.corpus if not c.startswith("hf:")])
    key = hashlib.sha256(f"{corpus_fingerprint(files)}:{settings.vocab_size}".encode()).hexdigest()[:20]
    target = cache_dir / "tokenizers" / key
    if workers.main and not (target / "tokenizer_config.json").is_file():
        with staged_directory(target, overwrite=True) as tmp:
            train_wordpiece(files, settings.vocab_size, tmp)
    workers.barrier()
    return load_tokenizer(target)


def _save_tokenizer(tokenizer, out: Path) -> None:
    """Tokenizer files into ``out``, each moved in whole, tokenizer_config.json (the marker read on
    resume) last: a kill never leaves a marker without the vocabulary."""
    if (out / "tokenizer_config.json").is_file():
        return
    staging = out / ".tokenizer.partial"
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer.save_pretrained(str(staging))
    for name in sorted(os.listdir(staging), key=lambda n: n == "tokenizer_config.json"):
        fsync_path(staging / name)
        os.replace(staging / name, out / name)
    fsync_path(out)
    shutil.rmtree(staging, ignore_errors=True)


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
    inherited = _inherited_config(settings)
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


_INHERITED = ("hidden_act", "layer_norm_eps", "max_position_embeddings", "type_vocab_size", "initializer_range",
              "init_from")


def _inherited_config(settings: PretrainSettings) -> dict[str, Any]:
    """Model-wide fields of the ``--init`` checkpoint (activation, LayerNorm epsilon, positions, where
    it came from): a model started from a pre-trained one keeps its source's."""
    path = Path(settings.init) / "config.json" if settings.init else None
    if path is None or not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))  # a SuperPLM's or an extracted model's
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}  # the checkpoint check that loads --init names what is wrong with the file
    return {k: config[k] for k in _INHERITED if k in config} if isinstance(config, dict) else {}


def _start(settings: PretrainSettings, workers: Workers, resume: bool, overwrite: bool) -> _Run:
    run_dir = _plan_out(settings, resume, overwrite)
    resume, out = run_dir.resume, run_dir.work
    space = resolve_space(settings)
    cache_dir = Path(settings.cache_dir or Path.home() / ".cache" / "autotinybert" / "data")
    tokenizer = _prepare_tokenizer(settings, out, workers, resume, cache_dir)
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
        _save_tokenizer(tokenizer, out)
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
    return masked_batch(run.train, rows, run.tokenizer, _row_generators(s.seed, step, rows, 1), run.workers.device)


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
    from .export import extract, save_export

    with staged_directory(out / "exported", overwrite=True) as tmp:
        save_export(extract(model.cpu(), arch), tmp, tokenizer)


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of all parameters: equal digests mean identical weights (workers in sync, resumes exact)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
