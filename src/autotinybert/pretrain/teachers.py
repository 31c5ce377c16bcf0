"""What the KD objective distills from: a frozen teacher model (`Teacher`), the step's largest
sub-model (`InPlaceTargets`, ``--distill-from largest``), or a teacher's outputs recorded once on
fixed batches (`RecordedTeacher`).

Each is called as ``teacher(input_ids, attention_mask) -> (last hidden state, last layer's
attention scores)`` and holds every layer's hidden state in ``layers`` (``--kd-layers mapped``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

from ..checkpoint import load_pretrained
from ..errors import UserError
from ..modeling import SuperBertForPreTraining
from ..space import Arch, SearchSpace


class Teacher:
    """A frozen BERT-family encoder giving last-layer hidden states and pre-softmax attention scores."""

    def __init__(self, path: str | Path, device: torch.device, trust_remote_code: bool = False) -> None:
        from transformers import AutoModel

        from ..builtin_data import resolve_model

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
