"""The pre-training losses of the active sub-model on one batch (AutoTinyBERT §3.2), and each
micro-batch's weight in the global batch's means.

* Objectives: ``mlm`` (AutoTinyBERT-MLM), ``kd`` (AutoTinyBERT-KD: MSE between the last layer's
  pre-softmax attention scores of student and teacher + MSE between the fit layer applied to the
  student's last hidden state and the teacher's), or ``both`` (their sum). ``--kd-layers mapped``
  adds every other layer against teacher layer round(i·L_t/L); ``--distill-from largest`` makes a
  sandwich step's largest sub-model the KD target of the others (in-place distillation,
  `teachers.InPlaceTargets`).
* `loss_shares`: every loss term is a sum over the global batch divided by the global count
  (masked tokens, tokens, attention pairs), so gradients summed over micro-batches and workers
  equal one process's.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.nn import functional as F

from ..data import IGNORE_INDEX
from ..modeling import SuperBertForPreTraining
from ..training import Workers
from .teachers import InPlaceTargets, Teacher


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
