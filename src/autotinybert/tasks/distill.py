"""Layer-mapped hidden-state distillation for task training (TinyBERT's hidden-state loss, CoFi's
layer-wise distillation): each student layer's output, projected to the teacher's width, is
pulled towards the output of the teacher layer it stands for, beside the logits term.

The projection is fitted by least squares on the first training rows before any step, so the term
starts at the student's real distance from the teacher: a student sliced from the teacher (any
channel order) starts near zero, and no random projection pushes a good student off its weights.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F


def layer_map(student_layers: int, teacher_layers: int, sliced_from: dict | None = None) -> list[tuple[int, int]]:
    """(student, teacher) hidden-state indices: the embeddings to the embeddings; a student sliced from
    a SuperPLM as deep as the teacher (``sliced_from``: {"of": its depth, "kept": its layers}), each
    layer to the one it is a slice of; else student layer j of L to teacher layer round(j * N / L), the
    last to the last (TinyBERT's map)."""
    if student_layers < 1 or teacher_layers < 1:
        raise ValueError("both models need at least one layer")
    if sliced_from and sliced_from.get("of") == teacher_layers and len(sliced_from.get("kept", ())) == student_layers:
        return [(0, 0)] + [(j + 1, layer + 1) for j, layer in enumerate(sliced_from["kept"])]
    return [(0, 0)] + [(j, math.floor(j * teacher_layers / student_layers + 0.5)) for j in range(1, student_layers + 1)]


def _masked_rows(hidden: Sequence[torch.Tensor], indices: Sequence[int], mask: torch.Tensor) -> torch.Tensor:
    """The real (unpadded) token vectors of the chosen hidden states, stacked: (tokens, width)."""
    keep = mask.bool()
    return torch.cat([hidden[i][keep] for i in indices])


class HiddenStateDistillation(torch.nn.Module):
    """The projection (student width -> teacher width, shared by every layer) and the layer map."""

    def __init__(self, student_width: int, teacher_width: int, pairs: list[tuple[int, int]]) -> None:
        super().__init__()
        self.projection = torch.nn.Linear(student_width, teacher_width)
        self.pairs = pairs

    @classmethod
    def between(cls, student, teacher) -> "HiddenStateDistillation":
        """For a student exported from a SuperPLM as deep as the teacher (a task SuperPLM is built from
        it), ``superplm_layers`` (written by `export.extract`) names the layers its layers are slices of."""
        s, t = student.config, teacher.config
        pairs = layer_map(s.num_hidden_layers, t.num_hidden_layers, getattr(s, "superplm_layers", None))
        return cls(s.hidden_size, t.hidden_size, pairs)

    def loss(self, student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
             mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the real tokens of every mapped layer pair."""
        student = _masked_rows(student_hidden, [s for s, _ in self.pairs], mask)
        teacher = _masked_rows(teacher_hidden, [t for _, t in self.pairs], mask)
        return F.mse_loss(self.projection(student), teacher.detach())

    @torch.no_grad()
    def fit(self, pairs: Sequence[tuple[Sequence[torch.Tensor], Sequence[torch.Tensor], torch.Tensor]]) -> None:
        """Least-squares projection from (student hidden, teacher hidden, mask) of a few batches."""
        # On the CPU in float64: its default driver (gelsy) handles the rank deficiency a LayerNorm
        # output has (its channels obey one affine constraint), which CUDA's `gels` does not.
        student = torch.cat([_masked_rows(s, [i for i, _ in self.pairs], m) for s, _, m in pairs]).double().cpu()
        teacher = torch.cat([_masked_rows(t, [i for _, i in self.pairs], m) for _, t, m in pairs]).double().cpu()
        design = torch.cat([student, torch.ones(len(student), 1, dtype=student.dtype)], dim=1)
        solution = torch.linalg.lstsq(design, teacher).solution           # (width_s + 1, width_t)
        self.projection.weight.copy_(solution[:-1].T.to(self.projection.weight.dtype))
        self.projection.bias.copy_(solution[-1].to(self.projection.bias.dtype))
