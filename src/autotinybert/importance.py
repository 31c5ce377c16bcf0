"""Importance ordering of a pre-trained BERT: function-preserving permutations before slicing.

A sub-model keeps the *first* hidden channels, FFN neurons, heads (mlm space) and per-head q/k
and v dims (kd space). Reordering them by importance first makes "first k" mean "k most
important" (DynaBERT's network rewiring; Minitron's activation-based ranking). Each reordering is
a permutation that leaves the full model's function unchanged:

* hidden channels — one permutation ``P`` of the residual stream: embedding columns, every
  LayerNorm, the input columns of Q/K/V, FFN-in, the pooler and the MLM transform, and the output
  rows of the attention output, FFN-out, the pooler and the MLM transform, and the input columns of
  a fine-tuned classifier (LayerNorm statistics
  do not depend on the order of the features, so the model is the same up to that reordering of
  its hidden states; the MLM logits are identical);
* FFN neurons of a layer — rows of FFN-in, columns of FFN-out;
* whole heads (mlm) — blocks of Q/K/V rows and of attention-output columns;
* per-head dims (kd) — q and k share a permutation within a head (q·k is unchanged); v has its
  own, applied to the matching attention-output columns.

Scores (higher = kept first) come from activations on calibration batches (``activation``:
mean |activation| per unit, as Minitron) or from weight norms (``weight``); ``none`` keeps the
source order. Everything works on a stock `transformers` BERT state dict (``bert.`` names, as in
`BertForMaskedLM`), so it is tested against the stock model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

METHODS = ("activation", "weight", "none")
_LAYER = "bert.encoder.layer.{}."


@dataclass
class Shape:
    """The dimensions of the BERT being reordered."""

    layers: int
    hidden: int
    heads: int
    head_dim: int

    @classmethod
    def of(cls, config) -> Shape:
        return cls(config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
                   config.hidden_size // config.num_attention_heads)


@dataclass
class Orders:
    """Permutations to apply (None: keep the order). Index lists are 'new position -> old unit'."""

    hidden: torch.Tensor | None = None
    ffn: list[torch.Tensor] | None = None         # per layer
    heads: list[torch.Tensor] | None = None       # per layer, over heads (mlm)
    qk: list[torch.Tensor] | None = None          # per layer, (heads, head_dim) per-head orders (kd)
    v: list[torch.Tensor] | None = None           # per layer, (heads, head_dim)


# --- applying orders ----------------------------------------------------------------------------
def permute(state: dict[str, torch.Tensor], shape: Shape, orders: Orders) -> dict[str, torch.Tensor]:
    """A new state dict with ``orders`` applied (tied tensors are permuted once, consistently)."""
    state = dict(state)
    if orders.hidden is not None:
        _permute_hidden(state, shape, orders.hidden)
    for layer in range(shape.layers):
        prefix = _LAYER.format(layer)
        if orders.ffn is not None:
            _rows(state, prefix + "intermediate.dense", orders.ffn[layer])
            _cols(state, prefix + "output.dense.weight", orders.ffn[layer])
        qk, v = _attention_orders(orders, shape, layer)
        if qk is not None:
            for name in ("query", "key"):
                _rows(state, prefix + f"attention.self.{name}", qk)
            _rows(state, prefix + "attention.self.value", v)
            _cols(state, prefix + "attention.output.dense.weight", v)
    return state


def _attention_orders(orders: Orders, shape: Shape, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Row orders of Q/K and of V (= attention-output columns) for one layer, or (None, None)."""
    d = shape.head_dim
    if orders.heads is not None:  # whole heads move: the same block order for q, k and v
        rows = (orders.heads[layer][:, None] * d + torch.arange(d)).reshape(-1)
        return rows, rows
    if orders.qk is not None:  # dims move inside each head
        base = (torch.arange(shape.heads) * d)[:, None]
        return (base + orders.qk[layer]).reshape(-1), (base + orders.v[layer]).reshape(-1)
    return None, None


def _permute_hidden(state: dict[str, torch.Tensor], shape: Shape, order: torch.Tensor) -> None:
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        _cols(state, f"bert.embeddings.{name}.weight", order)
    _vector(state, "bert.embeddings.LayerNorm", order)
    for layer in range(shape.layers):
        prefix = _LAYER.format(layer)
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "intermediate.dense"):
            _cols(state, prefix + name + ".weight", order)
        for name in ("attention.output.dense", "output.dense"):
            _rows(state, prefix + name, order)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            _vector(state, prefix + name, order)
    for name in ("bert.pooler.dense", "cls.predictions.transform.dense"):
        if name + ".weight" in state:
            _rows(state, name, order)
            _cols(state, name + ".weight", order)
    if "cls.predictions.transform.LayerNorm.weight" in state:
        _vector(state, "cls.predictions.transform.LayerNorm", order)
    if "classifier.weight" in state:  # a fine-tuned sequence classifier reads the pooled hidden state
        _cols(state, "classifier.weight", order)
    if "cls.predictions.decoder.weight" in state:  # tied to the word embeddings: the same tensor order
        state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"]


def _rows(state: dict, module: str, order: torch.Tensor) -> None:
    state[module + ".weight"] = state[module + ".weight"][order]
    if module + ".bias" in state:
        state[module + ".bias"] = state[module + ".bias"][order]


def _cols(state: dict, name: str, order: torch.Tensor) -> None:
    state[name] = state[name][:, order]


def _vector(state: dict, module: str, order: torch.Tensor) -> None:
    state[module + ".weight"] = state[module + ".weight"][order]
    state[module + ".bias"] = state[module + ".bias"][order]


# --- scores -------------------------------------------------------------------------------------
@dataclass
class Scores:
    """Importance per unit (higher is kept first); the same layout as `Orders`."""

    hidden: torch.Tensor
    ffn: list[torch.Tensor]
    heads: list[torch.Tensor]          # (heads,)
    qk: list[torch.Tensor]             # (heads, head_dim)
    v: list[torch.Tensor]              # (heads, head_dim)

    def orders(self, mode: str) -> Orders:
        """Descending orders; ties keep the source order (a stable sort), so scores of a model
        whose units are equally important leave it unchanged."""
        def desc(x: torch.Tensor) -> torch.Tensor:
            return torch.sort(-x, dim=-1, stable=True).indices

        per_head = mode == "kd"
        return Orders(hidden=desc(self.hidden), ffn=[desc(s) for s in self.ffn],
                      heads=None if per_head else [desc(s) for s in self.heads],
                      qk=[desc(s) for s in self.qk] if per_head else None,
                      v=[desc(s) for s in self.v] if per_head else None)


def weight_scores(state: dict[str, torch.Tensor], shape: Shape) -> Scores:
    """Scores from weight magnitudes only (no data): norms of the weights that read and write each unit."""
    hidden = torch.zeros(shape.hidden)
    ffn, heads, qk, v = [], [], [], []
    for layer in range(shape.layers):
        p = _LAYER.format(layer)
        w = {k: state[p + k] for k in ("attention.self.query.weight", "attention.self.key.weight",
                                       "attention.self.value.weight", "attention.output.dense.weight",
                                       "intermediate.dense.weight", "output.dense.weight",
                                       "output.LayerNorm.weight")}
        ffn.append(w["intermediate.dense.weight"].norm(dim=1) * w["output.dense.weight"].norm(dim=0))
        q_k = (w["attention.self.query.weight"].norm(dim=1) * w["attention.self.key.weight"].norm(dim=1))
        v_o = w["attention.self.value.weight"].norm(dim=1) * w["attention.output.dense.weight"].norm(dim=0)
        qk.append(q_k.reshape(shape.heads, shape.head_dim))
        v.append(v_o.reshape(shape.heads, shape.head_dim))
        heads.append(qk[-1].sum(-1) + v[-1].sum(-1))
        hidden += w["output.LayerNorm.weight"].abs()
    return Scores(hidden, ffn, heads, qk, v)


@torch.no_grad()
def activation_scores(model, batches: Iterable[dict[str, torch.Tensor]], shape: Shape) -> Scores:
    """Mean |activation| per unit over the non-padded tokens of ``batches``, read with forward
    hooks on a stock `transformers` BERT (``model.bert`` or a `BertModel`).

    Hidden channels: the LayerNorm outputs (embeddings and every layer), as Minitron; FFN neurons:
    the activation after GELU; heads: the norm of each head's context vector; q/k dims: mean |q|·|k|;
    v dims: mean |v| times the norm of the attention-output column it feeds.
    """
    bert = getattr(model, "bert", model)
    sums: dict[str, torch.Tensor] = {}
    mask_holder: dict[str, torch.Tensor] = {}
    hooks = [_hook(module, name, sums, mask_holder, shape.heads) for name, module in _watched(bert, shape)]
    count = 0
    model.eval()
    try:
        for batch in batches:
            mask_holder["mask"] = batch["attention_mask"].to(torch.float32)
            bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            count += int(batch["attention_mask"].sum())
    finally:
        for hook in hooks:
            hook.remove()
    if count == 0:
        raise ValueError("the calibration batches hold no tokens")
    mean = {k: v / count for k, v in sums.items()}
    return _scores_from_means(bert, mean, shape)


def _watched(bert, shape: Shape) -> list[tuple[str, torch.nn.Module]]:
    watched = [("hidden.emb", bert.embeddings.LayerNorm)]
    for i, layer in enumerate(bert.encoder.layer):
        watched += [(f"hidden.att{i}", layer.attention.output.LayerNorm), (f"hidden.out{i}", layer.output.LayerNorm),
                    (f"ffn{i}", layer.intermediate), (f"q{i}", layer.attention.self.query),
                    (f"k{i}", layer.attention.self.key), (f"v{i}", layer.attention.self.value),
                    (f"ctx{i}", layer.attention.self)]
    return watched


def _hook(module: torch.nn.Module, name: str, sums: dict, mask_holder: dict, heads: int):
    def record(_module, _inputs, output) -> None:
        x = output[0] if isinstance(output, tuple) else output                      # (B, T, width)
        mask = mask_holder["mask"][..., None]                                       # (B, T, 1)
        if name.startswith("ctx"):  # per-head context norms: (B, T, heads, head_dim) -> (B, T, heads)
            x = x.reshape(*x.shape[:2], heads, -1).norm(dim=-1)
        value = (x.abs() * mask).sum(dim=(0, 1))
        sums[name] = sums.get(name, 0) + value

    return module.register_forward_hook(record)


def _scores_from_means(bert, mean: dict[str, torch.Tensor], shape: Shape) -> Scores:
    hidden = mean["hidden.emb"] + sum(mean[f"hidden.att{i}"] + mean[f"hidden.out{i}"] for i in range(shape.layers))
    ffn, heads, qk, v = [], [], [], []
    for i, layer in enumerate(bert.encoder.layer):
        ffn.append(mean[f"ffn{i}"])
        heads.append(mean[f"ctx{i}"])
        qk.append((mean[f"q{i}"] * mean[f"k{i}"]).reshape(shape.heads, shape.head_dim))
        out_norm = layer.attention.output.dense.weight.norm(dim=0)
        v.append((mean[f"v{i}"] * out_norm).reshape(shape.heads, shape.head_dim))
    return Scores(hidden, ffn, heads, qk, v)
