"""Validation: MLM loss / accuracy (and, with a teacher, KD loss) of architectures on fixed masked batches.

Every architecture is scored on the same batches with the same masks (`validation_batches`), in
eval mode; the search's proxy evaluator (`evaluators.ProxyEvaluator`) scores candidates with the
same functions.
"""

from __future__ import annotations

import numpy as np
import torch

from ..data import IGNORE_INDEX, PackedSplit
from ..modeling import SuperBertForPreTraining
from ..space import Arch
from .batches import masked_batch, row_generators
from .objectives import step_loss
from .teachers import RecordedTeacher, Teacher


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
        fixed.append(masked_batch(split, rows, tokenizer, row_generators(seed, -1, rows, 3), device))
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
