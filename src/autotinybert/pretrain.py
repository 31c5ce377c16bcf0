"""One-shot SuperPLM pre-training (AutoTinyBERT §3.2) and further training of one architecture.

* Sampling (`ArchSampler`): ``random`` draws one sub-model per step, the same on every worker
  (official behaviour); ``per-worker`` lets each process draw its own; ``sandwich`` trains the
  largest, the smallest and ``k`` random sub-models each step. ``--samples-per-batch`` sums the
  gradients of several draws (official ``sample_times_per_batch``).
* Objectives: ``mlm`` (AutoTinyBERT-MLM), ``kd`` (AutoTinyBERT-KD: MSE between the last layer's
  pre-softmax attention scores of student and teacher + MSE between the fit layer applied to the
  student's last hidden state and the teacher's), or ``both`` (their sum).
* Determinism: every random choice of step ``s`` (architectures, batch order, masks, dropout)
  is derived from ``(seed, s, worker, micro-batch)``. A run killed and resumed from its last
  checkpoint therefore replays exactly the steps it lost, and ends with the same weights.
* Multi-process: launched by ``torchrun``, gradients are all-reduced by hand (sub-models differ
  between steps and, with ``per-worker``, between workers, which DDP's bucketing does not allow).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.nn import functional as F

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
from .files import atomic_write_json, staged_directory, write_stage_config
from .modeling import (
    SuperBertConfig,
    SuperBertForPreTraining,
    load_supernet,
    load_tokenizer,
    new_supernet,
    save_supernet,
)
from .settings import OBJECTIVES, SAMPLING_RULES, PretrainSettings  # noqa: F401 - re-exported
from .space import RELEASED, Arch, Dim, SearchSpace

# Changing these between a run and its --resume would silently change what is trained.
_RESUME_INVARIANT = ("corpus", "valid_corpus", "tokenizer", "vocab_size", "space", "max_layers", "max_hidden",
                     "max_ffn", "max_heads", "max_qkv", "objective",
                     "teacher", "sampling", "samples_per_batch", "arch", "init", "batch_size", "grad_accum", "lr",
                     "weight_decay", "warmup_ratio", "max_grad_norm", "bf16", "seq_len", "seed")


# --- distributed ------------------------------------------------------------------------------
@dataclass
class Workers:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def init_workers() -> Workers:
    """Join the torchrun process group if launched by torchrun (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Workers(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return Workers(dist.get_rank(), dist.get_world_size(), device)


def all_reduce_gradients(parameters: list[torch.nn.Parameter], workers: Workers) -> None:
    """Average gradients over workers in one flat buffer (unused slices contribute zeros)."""
    if workers.world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= workers.world
    offset = 0
    for p in parameters:
        n = p.numel()
        p.grad = flat[offset: offset + n].view_as(p).clone()
        offset += n


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

    def __init__(self, path: str | Path, device: torch.device) -> None:
        from transformers import AutoModel

        path = Path(path)
        if not (path / "config.json").is_file():
            raise UserError(f"--teacher {path} is not a checkpoint directory (no config.json)")
        try:
            self.model = AutoModel.from_pretrained(str(path), trust_remote_code=True).to(device).eval()
        except (OSError, ValueError) as err:
            raise UserError(f"cannot load the teacher {path}: {str(err).splitlines()[0]}") from None
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
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        x = self._query_key_input
        batch, seq_len, _ = x.shape
        heads = self.config.num_attention_heads
        query = self._last.query(x).view(batch, seq_len, heads, -1).transpose(1, 2)  # (B, H, T, d)
        key = self._last.key(x).view(batch, seq_len, heads, -1).transpose(1, 2)
        scores = query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1])  # (B, H, T, T)
        return hidden, scores


def kd_loss(student_scores: torch.Tensor, teacher_scores: torch.Tensor, student_fit: torch.Tensor,
            teacher_hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """AutoTinyBERT-KD: attention-score MSE + hidden-state MSE, over real (unpadded) tokens only."""
    keep = attention_mask.bool()                                   # (B, T)
    pairs = (keep[:, None, :, None] & keep[:, None, None, :]).expand_as(student_scores)  # (B, H, T, T)
    attention = F.mse_loss(student_scores[pairs], teacher_scores[pairs])
    hidden = F.mse_loss(student_fit[keep], teacher_hidden[keep])
    return attention + hidden


def step_loss(model: SuperBertForPreTraining, batch: dict[str, torch.Tensor], objective: str,
              teacher: Teacher | None) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of the active sub-model on one batch, with its parts for logging.

    MLM reads the masked ids; KD reads the original text, as the teacher does.
    """
    parts: dict[str, float] = {}
    loss = torch.zeros((), device=batch["input_ids"].device)
    if objective in ("mlm", "both"):
        out = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
        loss = loss + out.loss
        parts["mlm_loss"] = out.loss.item()
    if objective in ("kd", "both"):
        hidden, scores = teacher(batch["original_ids"], batch["attention_mask"])
        student = model(batch["original_ids"], batch["attention_mask"], output_attention_scores=True,
                        compute_logits=False)
        distill = kd_loss(student.attention_scores.float(), scores.float(), student.fit_hidden_state.float(),
                          hidden.float(), batch["attention_mask"])
        loss = loss + distill
        parts["kd_loss"] = distill.item()
    return loss, parts


# --- data order -------------------------------------------------------------------------------
def batch_indices(num_sequences: int, batch_size: int, workers: Workers, seed: int, position: int) -> np.ndarray:
    """Rows of global micro-batch ``position`` for this worker: a fresh permutation every epoch."""
    per_step = batch_size * workers.world
    per_epoch = num_sequences // per_step
    if per_epoch == 0:
        raise UserError(f"the corpus has {num_sequences} sequences, fewer than one global batch ({per_step}); "
                        "lower --batch-size or add text")
    epoch, within = divmod(position, per_epoch)
    order = np.random.default_rng(derive_seed(seed, epoch, 23)).permutation(num_sequences)
    start = within * per_step + workers.rank * batch_size
    return np.sort(order[start: start + batch_size])


def masked_batch(split: PackedSplit, indices: np.ndarray, tokenizer, generator: torch.Generator,
                 device: torch.device) -> dict[str, torch.Tensor]:
    batch = make_batch(split, indices)
    masked, labels = mask_tokens(batch["input_ids"], batch["attention_mask"], tokenizer.all_special_ids,
                                 tokenizer.mask_token_id, len(tokenizer), generator)
    return {"input_ids": masked.to(device), "labels": labels.to(device), "original_ids": batch["input_ids"].to(device),
            "attention_mask": batch["attention_mask"].to(device)}


# --- validation -------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: SuperBertForPreTraining, split: PackedSplit, tokenizer, archs: list[Arch], objective: str,
             teacher: Teacher | None, batch_size: int, batches: int, seed: int, device: torch.device) -> dict[str, dict]:
    """Validation MLM loss/accuracy (and KD loss) of each architecture on the same masked batches."""
    if len(split) == 0:
        return {}
    generator = torch.Generator().manual_seed(seed)
    fixed = [masked_batch(split, np.arange(start, min(start + batch_size, len(split))), tokenizer, generator, device)
             for start in range(0, min(len(split), batch_size * batches), batch_size)]
    was_training, previous = model.training, model.arch
    model.eval()
    results = {}
    try:
        for arch in archs:
            model.set_arch(arch)
            total_loss = correct = count = kd_total = 0.0
            for batch in fixed:
                out = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
                selected = batch["labels"][batch["labels"] != IGNORE_INDEX]
                total_loss += out.loss.item() * len(selected)
                correct += (out.logits.argmax(-1) == selected).sum().item()
                count += len(selected)
                if teacher is not None:
                    kd_total += step_loss(model, batch, "kd", teacher)[1]["kd_loss"]
            row = {"mlm_loss": total_loss / max(count, 1), "mlm_accuracy": correct / max(count, 1)}
            if teacher is not None:
                row["kd_loss"] = kd_total / len(fixed)
            results[str(arch)] = row
    finally:
        model.set_arch(previous)
        model.train(was_training)
    return results


# --- model set-up -----------------------------------------------------------------------------
def resolve_space(settings: PretrainSettings) -> SearchSpace:
    if settings.arch:
        return point_space(Arch.parse(settings.arch))
    return SearchSpace.load(settings.space).with_limits(**settings.space_limits)


def _exported_state(path: Path) -> dict[str, torch.Tensor]:
    """Weights of an extracted checkpoint under SuperPLM names (the MLM decoder is tied, so dropped)."""
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(str(path), trust_remote_code=True)
    return {k: v for k, v in model.state_dict().items() if not k.startswith("cls.predictions.decoder")}


def initial_weights(model: SuperBertForPreTraining, settings: PretrainSettings) -> None:
    """``--init``: a SuperPLM (its slice for ``--arch``, else all of it) or an extracted checkpoint."""
    path = Path(settings.init)
    if not (path / "config.json").is_file():
        raise UserError(f"--init {path} is not a checkpoint directory (no config.json)")
    model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    if model_type == SuperBertConfig.model_type:
        source = load_supernet(path)
        state = source.sliced_state_dict(Arch.parse(settings.arch)) if settings.arch else source.state_dict()
        state = {k: v for k, v in state.items() if not k.startswith("cls.predictions.decoder")}
    else:
        state = _exported_state(path)
    expected = model.state_dict()
    wrong = [k for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        raise UserError(f"--init {path}: {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, the model needs "
                        f"{tuple(expected[wrong[0]].shape)}; the checkpoint holds another architecture or vocabulary")
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay for biases and LayerNorm weights (BERT's recipe)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def linear_schedule(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


# --- checkpoints ------------------------------------------------------------------------------
CHECKPOINT_DIR = "checkpoint"
METRICS_FILE = "metrics.csv"
METRIC_FIELDS = ("step", "split", "arch", "loss", "mlm_loss", "mlm_accuracy", "kd_loss", "lr", "tokens_per_s")


def save_checkpoint(out: Path, model, optimizer, scheduler, step: int, tokenizer, settings: PretrainSettings) -> None:
    """Atomically replace ``out/checkpoint`` (weights + optimizer + scheduler + step), then refresh
    the SuperPLM files in ``out`` so ``autotinybert extract --supernet out`` works mid-training."""
    with staged_directory(out / CHECKPOINT_DIR, overwrite=True) as tmp:
        save_supernet(model, tmp)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "training_state.pt")
        atomic_write_json(tmp / "trainer_state.json", {"step": step, "settings": asdict(settings)})
    save_supernet(model, out / ".superplm.tmp")
    for name in ("config.json", "model.safetensors"):
        os.replace(out / ".superplm.tmp" / name, out / name)
    (out / ".superplm.tmp").rmdir()
    if tokenizer is not None and not (out / "tokenizer_config.json").is_file():
        tokenizer.save_pretrained(str(out))


def load_checkpoint(out: Path, model, optimizer, scheduler, settings: PretrainSettings) -> int:
    """Restore a run from ``out/checkpoint``; returns the step to continue from."""
    from safetensors.torch import load_file

    ckpt = out / CHECKPOINT_DIR
    if not (ckpt / "trainer_state.json").is_file():
        raise UserError(f"--resume: {out} has no checkpoint to resume; drop --resume to start a new run")
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"--resume: {ckpt / 'trainer_state.json'} is corrupt ({err}); delete {ckpt} to start over") from None
    saved = state.get("settings", {})
    changed = [k for k in _RESUME_INVARIANT if k in saved and saved[k] != asdict(settings)[k]]
    if changed:
        raise UserError(f"--resume with different {', '.join(changed)} than the checkpoint; "
                        "rerun with the original arguments (only --max-steps and logging may change)")
    try:
        weights = load_file(str(ckpt / "model.safetensors"))
        training = torch.load(ckpt / "training_state.pt", weights_only=True, map_location="cpu")
        model.load_state_dict(weights, strict=True)
        optimizer.load_state_dict(training["optimizer"])
        scheduler.load_state_dict(training["scheduler"])
    except Exception as err:  # any failure here means the files are unusable, whatever the library
        raise UserError(f"--resume: the checkpoint in {ckpt} is corrupt ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); delete it to start over") from None
    return int(state["step"])


def _trim_metrics(path: Path, step: int) -> None:
    """Drop metric rows written after the checkpoint we resume from (they will be re-logged)."""
    if not path.is_file():
        return
    with path.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if int(row["step"]) <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    _write_metrics(tmp, rows, mode="w")
    os.replace(tmp, path)


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


def _write_metrics(path: Path, rows: list[dict], mode: str = "a") -> None:
    new = mode == "w" or not path.is_file()
    with path.open(mode, newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=METRIC_FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)


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
        return load_tokenizer(settings.init)
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


def pretrain(settings: PretrainSettings, resume: bool = False,
             on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run (or resume) pre-training; returns the final summary also written to ``results.json``.

    ``on_step(step)`` is called after every optimiser step (progress hooks, tests).
    """
    settings.check()
    workers = init_workers()
    out = Path(settings.out)
    if not resume and (out / CHECKPOINT_DIR).exists():
        raise UserError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    space = resolve_space(settings)
    cache_dir = Path(settings.cache_dir or Path.home() / ".cache" / "autotinybert" / "data")
    tokenizer = _prepare_tokenizer(settings, out, workers, resume, cache_dir)
    teacher = Teacher(settings.teacher, workers.device) if settings.objective in ("kd", "both") else None
    if teacher is not None:
        teacher.check_fits(space, len(tokenizer))

    if workers.main:  # one process tokenises; the others read the cache it writes
        train, valid, cache_entry = build_dataset(settings.corpus, tokenizer, settings.seq_len, cache_dir,
                                                  settings.valid_corpus, text_column=settings.text_column)
    workers.barrier()
    if not workers.main:
        train, valid, cache_entry = build_dataset(settings.corpus, tokenizer, settings.seq_len, cache_dir,
                                                  settings.valid_corpus, text_column=settings.text_column)

    config = SuperBertConfig.from_space(
        space, vocab_size=len(tokenizer), max_position_embeddings=max(512, settings.seq_len),
        teacher_hidden_size=teacher.config.hidden_size if teacher else None,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = new_supernet(config, settings.seed)
    if settings.init:
        initial_weights(model, settings)
    model.to(workers.device).train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameter_groups(model, settings.weight_decay), lr=settings.lr)
    warmup = max(1, int(settings.warmup_ratio * settings.max_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(warmup, settings.max_steps))
    start = load_checkpoint(out, model, optimizer, scheduler, settings) if resume else 0
    if workers.main:
        write_stage_config(out, {**asdict(settings), "resume": resume})
        _trim_metrics(out / METRICS_FILE, start)

    sampler = ArchSampler(space, "random" if settings.arch else settings.sampling, settings.samples_per_batch,
                          settings.seed)
    panel = validation_panel(space)
    started = time.perf_counter()
    tokens_seen = 0
    autocast = torch.autocast(workers.device.type, dtype=torch.bfloat16, enabled=settings.bf16)
    progress = _progress_bar(settings, start, workers)
    last_eval: dict[str, dict] = {}
    board = TensorBoard(out, workers.main)
    # Dropout draws from torch's global generator: forked here so the caller's state is untouched,
    # and re-seeded per micro-batch so a resumed run replays the lost steps exactly.
    with torch.random.fork_rng(devices=[workers.device.index or 0] if workers.device.type == "cuda" else []):
        for step in range(start, settings.max_steps):
            archs = sampler.archs(step, workers.rank)
            parts: dict[str, float] = {}
            total = 0.0
            for micro in range(settings.grad_accum):
                position = step * settings.grad_accum + micro
                indices = batch_indices(len(train), settings.batch_size, workers, settings.seed, position)
                generator = torch.Generator().manual_seed(derive_seed(settings.seed, step, workers.rank, micro, 1))
                batch = masked_batch(train, indices, tokenizer, generator, workers.device)
                tokens_seen += int(batch["attention_mask"].sum()) * len(archs)
                for index, arch in enumerate(archs):
                    torch.manual_seed(derive_seed(settings.seed, step, workers.rank, micro, index, 2))
                    model.set_arch(arch)
                    with autocast:
                        loss, loss_parts = step_loss(model, batch, settings.objective, teacher)
                    (loss / (settings.grad_accum * len(archs))).backward()
                    total += loss.item() / (settings.grad_accum * len(archs))
                    for key, value in loss_parts.items():
                        parts[key] = parts.get(key, 0.0) + value / (settings.grad_accum * len(archs))
            _check_finite(total, step, out, workers)
            all_reduce_gradients(parameters, workers)
            torch.nn.utils.clip_grad_norm_(parameters, settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            rate = int(tokens_seen / max(time.perf_counter() - started, 1e-9)) * workers.world
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{total:.3f}", tok_s=rate, arch=str(archs[0]))
            if workers.main and (done % settings.log_every == 0 or done == settings.max_steps):
                rows = [{
                    "step": done, "split": "train", "arch": " ".join(map(str, archs)), "loss": round(total, 5),
                    **{k: round(v, 5) for k, v in parts.items()}, "lr": scheduler.get_last_lr()[0],
                    "tokens_per_s": rate,
                }]
                _write_metrics(out / METRICS_FILE, rows)
                board.log(rows)
            if done % settings.eval_every == 0 or done == settings.max_steps:
                if workers.main:
                    last_eval = evaluate(model, valid, tokenizer, panel, settings.objective, teacher,
                                         settings.batch_size, settings.eval_batches, settings.seed, workers.device)
                    rows = [{"step": done, "split": "valid", "arch": arch, **row} for arch, row in last_eval.items()]
                    _write_metrics(out / METRICS_FILE, rows)
                    board.log(rows)
                workers.barrier()
            if done % settings.save_every == 0 or done == settings.max_steps:
                if workers.main:
                    save_checkpoint(out, model, optimizer, scheduler, done, tokenizer, settings)
                workers.barrier()
            if on_step is not None:
                on_step(done)
    if progress is not None:
        progress.close()
    summary = {
        "steps": settings.max_steps,
        "resumed_from": start,
        "space": space.to_dict(),
        "validation": last_eval,
        "wall_seconds": round(time.perf_counter() - started, 2),
        "tokens_per_second": int(tokens_seen / max(time.perf_counter() - started, 1e-9)) * workers.world,
        "workers": workers.world,
        "weights_digest": weights_digest(model),
        "data_cache": str(cache_entry),
        "train_sequences": len(train),
        "valid_sequences": len(valid),
    }
    if workers.main:
        if settings.arch:
            _export_fixed(model, Arch.parse(settings.arch), out, tokenizer)
            summary["exported"] = str(out / "exported")
        atomic_write_json(out / "results.json", summary)
    return summary


def _check_finite(loss: float, step: int, out: Path, workers: Workers) -> None:
    value = torch.tensor([loss])
    if workers.world > 1:
        torch.distributed.all_reduce(value)
    if not math.isfinite(value.item()):
        raise UserError(f"the loss became {value.item()} at step {step + 1}; nothing was saved from this step. "
                        f"Lower --lr (or use --bf16 off) and continue from the last checkpoint in {out} with --resume")


def _export_fixed(model: SuperBertForPreTraining, arch: Arch, out: Path, tokenizer) -> None:
    """Further training ends with an ordinary Hugging Face checkpoint of the trained architecture."""
    from .export import extract, save_export

    with staged_directory(out / "exported", overwrite=True) as tmp:
        save_export(extract(model.cpu(), arch), tmp, tokenizer)


def _progress_bar(settings: PretrainSettings, start: int, workers: Workers):
    if not settings.progress or not workers.main:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=settings.max_steps, initial=start, desc="pretrain", unit="step", dynamic_ncols=True)


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of all parameters: equal digests mean identical weights (workers in sync, resumes exact)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
