"""An independent statement of the sub-model rule, for equivalence tests.

Nothing here calls autotinybert's slicing code (`_HeadSlice`, `sliced_state_dict`, `extract`):
`reference_state_dict` picks each tensor of a sub-model out of the SuperPLM's *full* tensors
with explicit index lists, written from DESIGN.md / the official SuperBERT code, and
`reference_forward` is a plain-torch BERT forward. Tests compare the sliced SuperPLM, the
extracted model and reloaded checkpoints with these.

``wrong=KIND`` replaces one piece of the rule by a plausible mistake (mostly: *last* instead of
*first* indices) so tests can prove that their comparison notices it.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

# Wrong rules, by the tensor kind they break. Head rules are mode specific (see `_head_rows`).
COMMON_WRONG = (
    "layers",                       # last L layers instead of the first
    "word_embeddings", "position_embeddings", "token_type_embeddings",   # last d_m columns
    "embeddings.LayerNorm", "attention.output.LayerNorm", "output.LayerNorm",  # last d_m features
    "query", "key", "value",        # that projection alone takes the mode's wrong head rows
    "qkv_input",                    # Q/K/V read the last d_m input columns
    "attention.output.dense",       # W_o reads the wrong input columns (the other heads' / dims')
    "attention.output.rows",        # W_o writes the last d_m rows
    "intermediate.dense",           # last d_f rows
    "output.dense",                 # last d_f input columns
    "transform.dense", "transform.LayerNorm",  # MLM head transform: last d_m
    "decoder",                      # decoder not tied to the first d_m embedding columns
    "mlm_bias",                     # decoder bias dropped
    "pooler", "fit_dense",          # last d_m input columns
)
MLM_WRONG = COMMON_WRONG + ("last_heads",)                      # the last h heads, everywhere
KD_WRONG = COMMON_WRONG + ("kd_last_dims", "kd_contiguous")    # each head's last dims / W[:qkv]


def _first(n: int) -> list[int]:
    return list(range(n))


def _last(n: int, total: int) -> list[int]:
    return list(range(total - n, total))


def _head_rows(mode: str, heads: int, qkv: int, max_heads: int, max_dims: int, wrong: str | None) -> list[int]:
    """Rows of Q/K/V (= input columns of W_o) that a sub-model uses, head by head.

    Weights are laid out head by head, ``max_dims`` rows per head: head i owns rows
    ``max_dims*i .. max_dims*i + max_dims``.
    """
    if mode == "mlm":  # the first h heads, each of full width
        used = _last(heads, max_heads) if wrong == "last_heads" else _first(heads)
        dims = _first(max_dims)
    else:  # kd: all heads, each trimmed to its first qkv/heads dims
        if wrong == "kd_contiguous":  # the classic mistake: W[:qkv] mixes whole heads
            return _first(qkv)
        used = _first(max_heads)
        per_head = qkv // max_heads
        dims = _last(per_head, max_dims) if wrong == "kd_last_dims" else _first(per_head)
    return [head * max_dims + j for head in used for j in dims]


def reference_state_dict(supernet, arch, wrong: str | None = None) -> dict[str, torch.Tensor]:
    """``arch``'s weights under BERT names, picked from ``supernet``'s full tensors by index lists.

    Holds the pooler (``bert.pooler.*``), the MLM head with an explicit
    ``cls.predictions.decoder.*`` and, when the SuperPLM has one, ``fit_dense.*``.
    """
    config = supernet.config
    mode = config.search_space.mode
    full = {name: tensor.detach().clone() for name, tensor in supernet.state_dict().items()}
    d, f, qkv = arch.hidden_size, arch.intermediate_size, arch.qkv_size
    d_max, f_max, layers_max = config.hidden_size, config.intermediate_size, config.num_hidden_layers

    def hidden(kind: str) -> list[int]:
        return _last(d, d_max) if wrong == kind else _first(d)

    def heads(kind: str) -> list[int]:
        # a per-projection mistake uses the mode's wrong head rule for that projection only
        rule = wrong if wrong in ("last_heads", "kd_last_dims", "kd_contiguous") else None
        if wrong == kind:
            rule = "last_heads" if mode == "mlm" else "kd_last_dims"
        return _head_rows(mode, arch.num_attention_heads, qkv, config.num_attention_heads, config.head_size, rule)

    state: dict[str, torch.Tensor] = {}
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        state[f"bert.embeddings.{name}.weight"] = full[f"bert.embeddings.{name}.weight"][:, hidden(name)]
    for part in ("weight", "bias"):
        state[f"bert.embeddings.LayerNorm.{part}"] = full[f"bert.embeddings.LayerNorm.{part}"][hidden("embeddings.LayerNorm")]

    source_layers = _last(arch.num_hidden_layers, layers_max) if wrong == "layers" else _first(arch.num_hidden_layers)
    ffn_rows = _last(f, f_max) if wrong == "intermediate.dense" else _first(f)
    ffn_cols = _last(f, f_max) if wrong == "output.dense" else _first(f)
    for i, source in enumerate(source_layers):
        src, dst = f"bert.encoder.layer.{source}", f"bert.encoder.layer.{i}"
        for name in ("query", "key", "value"):
            rows = heads(name)
            cols = hidden("qkv_input")
            state[f"{dst}.attention.self.{name}.weight"] = full[f"{src}.attention.self.{name}.weight"][rows][:, cols]
            state[f"{dst}.attention.self.{name}.bias"] = full[f"{src}.attention.self.{name}.bias"][rows]
        wo_rows = hidden("attention.output.rows")
        wo_cols = heads("attention.output.dense")
        state[f"{dst}.attention.output.dense.weight"] = full[f"{src}.attention.output.dense.weight"][wo_rows][:, wo_cols]
        state[f"{dst}.attention.output.dense.bias"] = full[f"{src}.attention.output.dense.bias"][wo_rows]
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            for part in ("weight", "bias"):
                state[f"{dst}.{ln}.{part}"] = full[f"{src}.{ln}.{part}"][hidden(ln)]
        state[f"{dst}.intermediate.dense.weight"] = full[f"{src}.intermediate.dense.weight"][ffn_rows][:, _first(d)]
        state[f"{dst}.intermediate.dense.bias"] = full[f"{src}.intermediate.dense.bias"][ffn_rows]
        state[f"{dst}.output.dense.weight"] = full[f"{src}.output.dense.weight"][_first(d)][:, ffn_cols]
        state[f"{dst}.output.dense.bias"] = full[f"{src}.output.dense.bias"][_first(d)]

    state["bert.pooler.dense.weight"] = full["bert.pooler.dense.weight"][_first(d)][:, hidden("pooler")]
    state["bert.pooler.dense.bias"] = full["bert.pooler.dense.bias"][_first(d)]
    transform = "cls.predictions.transform"
    state[f"{transform}.dense.weight"] = full[f"{transform}.dense.weight"][hidden("transform.dense")][:, _first(d)]
    state[f"{transform}.dense.bias"] = full[f"{transform}.dense.bias"][hidden("transform.dense")]
    for part in ("weight", "bias"):
        state[f"{transform}.LayerNorm.{part}"] = full[f"{transform}.LayerNorm.{part}"][hidden("transform.LayerNorm")]
    # The decoder is tied to the word embeddings: the same first d_m columns, whole vocabulary.
    embeddings = full["bert.embeddings.word_embeddings.weight"]
    state["cls.predictions.decoder.weight"] = embeddings[:, hidden("decoder")]
    bias = full["cls.predictions.bias"]
    state["cls.predictions.bias"] = torch.zeros_like(bias) if wrong == "mlm_bias" else bias
    state["cls.predictions.decoder.bias"] = state["cls.predictions.bias"]
    if "fit_dense.weight" in full:  # KD fit layer: student d_m -> teacher hidden, input side sliced
        state["fit_dense.weight"] = full["fit_dense.weight"][:, hidden("fit_dense")]
        state["fit_dense.bias"] = full["fit_dense.bias"]
    return state


def bert_state(state: dict[str, torch.Tensor], encoder_only: bool = False) -> dict[str, torch.Tensor]:
    """The keys a `BertForMaskedLM` (or, ``encoder_only``, a `BertModel`) holds."""
    if encoder_only:
        return {k[len("bert."):]: v for k, v in state.items() if k.startswith("bert.")}
    return {k: v for k, v in state.items() if not k.startswith(("bert.pooler.", "fit_dense."))}


def reference_forward(state: dict[str, torch.Tensor], num_heads: int, inputs: dict[str, torch.Tensor],
                      eps: float = 1e-12) -> dict[str, torch.Tensor]:
    """BERT in plain torch (eval mode, exact GELU) on ``state`` from `reference_state_dict`.

    Returns ``logits``, ``last_hidden_state``, ``hidden_states`` (embeddings + every layer),
    ``pooler_output``, ``scores`` (last layer, pre-softmax, no mask added) and, when the state
    has a fit layer, ``fit_hidden_state``.
    """
    def linear(x, name):
        return x @ state[f"{name}.weight"].T + state[f"{name}.bias"]

    def layer_norm(x, name):
        return F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps)

    ids, mask, types = inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"]
    batch, seq_len = ids.shape
    x = (state["bert.embeddings.word_embeddings.weight"][ids]
         + state["bert.embeddings.position_embeddings.weight"][:seq_len][None]
         + state["bert.embeddings.token_type_embeddings.weight"][types])
    x = layer_norm(x, "bert.embeddings.LayerNorm")
    hidden_states = [x]
    layers = len({k.split(".")[3] for k in state if k.startswith("bert.encoder.layer.")})
    padded_key = (mask == 0)[:, None, None, :]  # (B, 1, 1, T)
    scores = None
    for i in range(layers):
        p = f"bert.encoder.layer.{i}"

        def split(t):  # (B, T, h*d) -> (B, h, T, d)
            return t.view(batch, seq_len, num_heads, -1).transpose(1, 2)

        q, k, v = (split(linear(x, f"{p}.attention.self.{n}")) for n in ("query", "key", "value"))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, h, T, T)
        probs = scores.masked_fill(padded_key, float("-inf")).softmax(-1)
        context = (probs @ v).transpose(1, 2).reshape(batch, seq_len, -1)
        attended = layer_norm(linear(context, f"{p}.attention.output.dense") + x, f"{p}.attention.output.LayerNorm")
        inner = F.gelu(linear(attended, f"{p}.intermediate.dense"))
        x = layer_norm(linear(inner, f"{p}.output.dense") + attended, f"{p}.output.LayerNorm")
        hidden_states.append(x)
    transformed = layer_norm(F.gelu(linear(x, "cls.predictions.transform.dense")), "cls.predictions.transform.LayerNorm")
    out = {
        "logits": transformed @ state["cls.predictions.decoder.weight"].T + state["cls.predictions.bias"],
        "last_hidden_state": x,
        "hidden_states": tuple(hidden_states),
        "pooler_output": torch.tanh(linear(x[:, 0], "bert.pooler.dense")),
        "scores": scores,
    }
    if "fit_dense.weight" in state:
        out["fit_hidden_state"] = linear(x, "fit_dense")
    return out
