"""The training toolkit shared by pre-training, further training (`pretrain --arch`) and fine-tuning.

* Optimiser: `adamw(model, lr, weight_decay)`: AdamW in two groups by one rule, no weight decay
  for biases and LayerNorm weights (`parameter_groups`, BERT's recipe, as in HF Trainer).
* Schedule: `Schedule(peak, total, warmup_ratio)`: BERT's linear warm-up then linear decay to 0.
  Optimiser step ``s`` (0-based) runs at ``peak * (s + 1) / warmup`` during the warm-up and
  ``peak * (total - s) / (total - warmup)`` after it; ``warmup = ceil(warmup_ratio * total)``
  (`warmup_steps`, HF's rounding; ratio 0 means no warm-up). The rate is a pure function of the
  step, so a checkpoint needs no scheduler state besides the step.
* `clip_and_step`: gradient clipping, the optimiser step, gradients back to None. A parameter
  whose gradient is None (unused by the sampled sub-model) is not touched: no momentum, no decay.
* Distributed (`Workers`, `init_workers`, `all_reduce_gradients`): see that function for why
  the all-reduce is by hand rather than DDP.
* Checkpoints (`save_checkpoint`, `load_checkpoint`, `has_checkpoint`): model + optimizer +
  JSON state (step, counters, settings) + named extra tensors (e.g. an RNG state), in
  safetensors and JSON; no pickle anywhere. Crash-safe at any instant: see `save_checkpoint`.
* `StopOnSigterm` / `Preempted`: SIGTERM (what schedulers send before preemption) is noted by a
  handler; the loop saves a checkpoint at the next step boundary and raises `Preempted`, whose
  message is the one line to print; exit code 143.
* `MetricsLog` (CSV rows, trimmed on resume), `progress_bar` (tqdm).

Resume rule (one for every training command, `pretrain` and `finetune`; docs/pretrain.md):
a run lives in its ``--out`` directory. Without ``--resume`` a directory that already holds a run
is refused, so nothing is overwritten by accident. With ``--resume`` the run continues from the
last complete checkpoint in ``--out`` — or, when it has none yet (it was stopped before its first
checkpoint), starts from step 0. So after *any* interruption (Ctrl-C, SIGTERM, SIGKILL, power
loss) the advice is the same: rerun the command with ``--resume``. Settings that change what is
trained must equal the recorded ones (each stage lists which may change). The resumed run
replays the lost steps exactly and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from .errors import Preempted, UserError
from .files import atomic_write_json, atomic_write_text, fsync_path, fsync_tree

__all__ = ["Preempted", "parameter_groups", "adamw", "warmup_steps", "Schedule", "clip_and_step", "Workers",
           "init_workers", "all_reduce_gradients", "save_checkpoint", "load_checkpoint", "has_checkpoint",
           "flatten_optimizer", "unflatten_optimizer", "StopOnSigterm", "MetricsLog", "progress_bar"]


# --- optimiser and schedule ------------------------------------------------------------------
def _no_decay(module: torch.nn.Module, name: str) -> bool:
    return name == "bias" or isinstance(module, torch.nn.LayerNorm) or "LayerNorm" in type(module).__name__


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay for biases and LayerNorm weights (BERT's recipe).

    One rule by module type and parameter name (a LayerNorm's weight and bias, any ``bias``),
    so it holds for the SuperPLM, stock BERT and the exported model types alike.
    """
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:  # tied weights appear once
                continue
            seen.add(id(param))
            (no_decay if _no_decay(module, name) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(parameter_groups(model, weight_decay), lr=lr)


def warmup_steps(ratio: float, total: int) -> int:
    """``ceil(ratio * total)`` warm-up steps (the epsilon keeps 0.1 * 30 at 3, not 4)."""
    return min(total, max(0, math.ceil(ratio * total - 1e-9)))


@dataclass(frozen=True)
class Schedule:
    """BERT's linear warm-up then linear decay to 0, as a pure function of the step."""

    peak: float
    total: int
    warmup_ratio: float

    @property
    def warmup(self) -> int:
        return warmup_steps(self.warmup_ratio, self.total)

    def lr(self, step: int) -> float:
        """Learning rate of optimiser step ``step`` (0-based)."""
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        return self.peak * max(0.0, (self.total - step) / max(1, self.total - self.warmup))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        rate = self.lr(step)
        for group in optimizer.param_groups:
            group["lr"] = rate
        return rate


def clip_and_step(optimizer: torch.optim.Optimizer, parameters: Iterable[torch.nn.Parameter],
                  max_grad_norm: float) -> None:
    """Clip the global gradient norm, step, and reset gradients to None (unused tensors stay untouched)."""
    torch.nn.utils.clip_grad_norm_([p for p in parameters if p.grad is not None], max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# --- distributed ---------------------------------------------------------------------------
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

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over workers (float64, so counts stay exact)."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(tensor)
        return tensor.tolist()


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
    """Sum gradients over workers; a parameter that no worker used keeps ``grad = None``.

    Each worker's loss is already divided by the *global* normaliser (e.g. the number of masked
    tokens over all workers), so the sum is the gradient of the loss of the whole global batch,
    as one process would compute it. A parameter used by some workers only (``per-worker``
    sampling) gets zeros from the others: that is its gradient of the global loss. One that no
    worker used stays None, so AdamW leaves it untouched (no momentum, no weight decay), again as
    in one process. Why not DDP: the set of used parameters changes every step (sampled depth and
    widths); DDP needs ``find_unused_parameters`` and still all-reduces zeros for unused ones,
    which AdamW would then move.
    """
    if workers.world == 1:
        return
    used = torch.tensor([p.grad is not None for p in parameters], dtype=torch.float32, device=workers.device)
    torch.distributed.all_reduce(used)
    active = [p for p, count in zip(parameters, used.tolist()) if count > 0]
    if not active:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in active])
    torch.distributed.all_reduce(flat)
    offset = 0
    for p in active:
        p.grad = flat[offset: offset + p.numel()].view_as(p).clone()
        offset += p.numel()


# --- checkpoints -----------------------------------------------------------------------------
STATE_FILE = "trainer_state.json"
FORMAT = "autotinybert-checkpoint/1"


def flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Optimizer state as flat tensors (``state.<param>.<key>``) plus JSON-able param groups."""
    tensors = {}
    for index, values in state_dict["state"].items():
        for key, value in values.items():
            tensors[f"state.{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, state_dict["param_groups"]


def unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    # JSON turned tuples (betas) into lists; give them back as the optimizer made them.
    groups = [{k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()} for g in groups]
    return {"state": state, "param_groups": groups}


def has_checkpoint(directory: str | Path) -> bool:
    return (Path(directory) / STATE_FILE).is_file()


def _read_state(directory: Path) -> dict | None:
    try:
        return json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def save_checkpoint(directory: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None,
                    write_extra: Callable[[Path], None] | None = None) -> None:
    """Write a checkpoint into ``directory``, crash-safe at any instant.

    Layout: ``directory/trainer_state.json`` (the JSON ``state`` plus the optimizer's param
    groups and the name of the generation it describes) and ``directory/<generation>/`` with
    ``model.safetensors``, ``optimizer.safetensors`` (optimizer tensors and ``tensors``) and
    whatever ``write_extra(dir)`` adds. A new generation is written and fsynced next to the
    current one; replacing ``trainer_state.json`` (atomic) is the commit; the old generation is
    deleted after it. Killed at any instant, ``trainer_state.json`` names a complete generation
    (old or new), and the directory itself never disappears; leftovers of a killed save are
    removed by the next save or load.
    """
    from safetensors.torch import save_file, save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    previous = (_read_state(directory) or {}).get("generation")
    _remove_unreferenced(directory, previous)
    generation = f"step-{int(state.get('step', 0)):08d}"
    if generation == previous:
        generation += "b"
    target = directory / generation
    target.mkdir()
    flat, groups = flatten_optimizer(optimizer.state_dict())
    flat.update({f"extra.{name}": value.detach().cpu().contiguous() for name, value in (tensors or {}).items()})
    save_model(model, str(target / "model.safetensors"))
    save_file(flat, str(target / "optimizer.safetensors"))
    if write_extra is not None:
        write_extra(target)
    fsync_tree(target)
    fsync_path(directory)
    atomic_write_json(directory / STATE_FILE, {**state, "format": FORMAT, "generation": generation,
                                                "param_groups": groups})
    _remove_unreferenced(directory, generation)


def _remove_unreferenced(directory: Path, generation: str | None) -> None:
    """Delete generations other than ``generation`` and temporary files of killed writes."""
    for entry in directory.iterdir():
        if entry.name in (STATE_FILE, generation):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name.startswith("."):
            entry.unlink(missing_ok=True)


def load_checkpoint(directory: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    check: Callable[[dict], None] | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore ``model`` and ``optimizer``; returns (the JSON state, the extra tensors).

    ``check(state)`` runs on the JSON state before any tensor is read (e.g. to refuse changed
    settings). Anything unreadable is a `UserError` that names the directory and the fix.
    """
    from safetensors.torch import load_file, load_model

    directory = Path(directory)
    try:
        state = _read_state(directory)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"--resume: {directory / STATE_FILE} is corrupt ({err}); delete {directory} to start over") from None
    if state is None:
        raise UserError(f"--resume: {directory} holds no checkpoint")
    if state.get("format") != FORMAT:
        raise UserError(f"--resume: {directory} was written by an older autotinybert (pickled optimizer state); "
                        f"delete {directory} to start over")
    if check is not None:
        check(state)
    _remove_unreferenced(directory, state["generation"])
    target = directory / state["generation"]
    try:
        load_model(model, str(target / "model.safetensors"), strict=True)
        flat = load_file(str(target / "optimizer.safetensors"))
        extra = {k[len("extra."):]: flat.pop(k) for k in list(flat) if k.startswith("extra.")}
        optimizer.load_state_dict(unflatten_optimizer(flat, state["param_groups"]))
    except Exception as err:  # any failure here means the files are unusable, whatever the library
        raise UserError(f"--resume: the checkpoint in {directory} is corrupt ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); delete it to start over") from None
    return state, extra


# --- SIGTERM --------------------------------------------------------------------------------
class StopOnSigterm:
    """Within the ``with`` block, SIGTERM only sets `requested`; the previous handler comes back after.

    The training loop checks `requested` at each step boundary, saves a checkpoint and raises
    `preempted(step)`. Outside the main thread (no signal handlers there) it does nothing.
    """

    def __init__(self, command: str) -> None:
        self.command = command
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __enter__(self) -> "StopOnSigterm":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def preempted(self, step: int) -> Preempted:
        error = Preempted(f"stopped by SIGTERM at step {step}; checkpoint saved; "
                          f"rerun the same {self.command} command with --resume to continue")
        error.command, error.step = self.command, step  # for callers that word their own advice (develop)
        return error


# --- metrics and progress ----------------------------------------------------------------------
class MetricsLog:
    """Rows of a CSV file with fixed columns, appended as training goes.

    `trim(step)` (at the start of every run, fresh or resumed) keeps only the complete rows up to
    ``step``: rows logged after the checkpoint are logged again by the replayed steps, and a row
    torn by a kill mid-write is dropped.
    """

    def __init__(self, path: Path, fields: tuple[str, ...]) -> None:
        self.path, self.fields = Path(path), fields

    def _text(self, rows: list[dict], header: bool) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.fields, extrasaction="ignore", lineterminator="\n")
        if header:
            writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()

    def trim(self, step: int) -> None:
        kept: list[dict] = []
        if self.path.is_file():
            text = self.path.read_text(encoding="utf-8")
            lines = text.split("\n")[:-1]  # the last piece is "" or a torn row
            if lines and lines[0] == ",".join(self.fields):
                for row in csv.DictReader(io.StringIO("\n".join(lines) + "\n")):
                    if None not in row and None not in row.values() and row["step"].isdigit() and int(row["step"]) <= step:
                        kept.append(row)
        atomic_write_text(self.path, self._text(kept, header=True))

    def append(self, rows: list[dict]) -> None:
        new = not self.path.is_file()
        with self.path.open("a", encoding="utf-8", newline="") as handle:
            handle.write(self._text(rows, header=new))  # one write: a kill tears at most the last row


def progress_bar(total: int, initial: int, desc: str, enabled: bool):
    """A tqdm bar (disabled: its methods do nothing, `write` still prints)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, disable=not enabled)
