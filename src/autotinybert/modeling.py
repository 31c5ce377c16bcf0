"""The SuperPLM: one weight-sharing BERT whose forward runs any architecture of a search space.

Sub-model rule of the official AutoTinyBERT code (DESIGN.md): the first ``L`` layers; every
matrix sliced to its first rows/columns (``W[:out, :in]``); embeddings and LayerNorms to their
first ``d_m`` features (statistics over the sliced features only); the MLM decoder tied to the
word embeddings. Attention weights are stored head by head, ``(heads_max, head_size_max, ...)``:

* mlm space: the first ``h`` heads of full width (``qkv = h * head_size``),
* kd space: all heads, each trimmed to its first ``qkv / heads`` dims (rows ``64*i .. 64*i+d``).

Slices are views taken in ``forward``; nothing is cached, so gradients reach the shared weights.
Module names mirror `BertForMaskedLM`, so a BERT state dict loads into the largest sub-model and
`sliced_state_dict` feeds `load_state_dict(strict=True)` of the exported model.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput

from .errors import UserError
from .hf.modeling_autotinybert import additive_attention_mask  # one masking rule for supernet and export
from .space import Arch, SearchSpace, check_depth_layers



class SuperBertConfig(PretrainedConfig):
    """Configuration of a SuperPLM: the search space it serves plus BERT's usual fields.

    The five architecture fields hold the *largest* architecture (the stored weight shapes).
    """

    model_type = "autotinybert-superplm"

    def __init__(
        self,
        space: dict | None = None,
        vocab_size: int = 30522,
        max_position_embeddings: int = 512,
        type_vocab_size: int = 2,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.1,
        attention_probs_dropout_prob: float = 0.1,
        layer_norm_eps: float = 1e-12,
        initializer_range: float = 0.02,
        pad_token_id: int = 0,
        teacher_hidden_size: int | None = None,
        depth_order: str = "first",
        depth_layers: dict[str, list[int]] | None = None,
        **kwargs: Any,
    ) -> None:
        for derived in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "qkv_size"):
            kwargs.pop(derived, None)  # recomputed from the space below
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        self.space = space if space is not None else SearchSpace.paper("mlm").to_dict()
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.teacher_hidden_size = teacher_hidden_size
        # Which layers a depth-L sub-model keeps (space.depth_layers); None: the first L (the paper).
        self.depth_order = depth_order
        self.depth_layers = depth_layers
        largest = self.search_space.largest()
        if depth_layers is not None:
            check_depth_layers(depth_layers, largest.num_hidden_layers, self.search_space.layers.values())
        self.num_hidden_layers = largest.num_hidden_layers
        self.hidden_size = largest.hidden_size
        self.intermediate_size = largest.intermediate_size
        self.num_attention_heads = largest.num_attention_heads
        self.qkv_size = largest.qkv_size
        self.head_size = self.search_space.max_head_size

    @property
    def search_space(self) -> SearchSpace:
        return SearchSpace.from_dict(self.space)

    def kept_layers(self, depth: int) -> tuple[int, ...]:
        """Indices of the SuperPLM layers a sub-model of ``depth`` layers runs, in order."""
        if self.depth_layers is None:
            return tuple(range(depth))
        return tuple(self.depth_layers[str(depth)])

    @classmethod
    def from_space(cls, space: SearchSpace, vocab_size: int, max_position_embeddings: int = 512,
                   **kwargs: Any) -> SuperBertConfig:
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise UserError(f"vocab_size must be a positive integer, got {vocab_size!r}")
        return cls(space=space.to_dict(), vocab_size=vocab_size,
                   max_position_embeddings=max_position_embeddings, **kwargs)


# Known to AutoConfig so tools that open a SuperPLM directory (e.g. AutoTokenizer) recognise it.
AutoConfig.register(SuperBertConfig.model_type, SuperBertConfig, exist_ok=True)


# --- elastic functional pieces -------------------------------------------------------------
def _layer_norm(module: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the first ``x.shape[-1]`` features, statistics over those features only."""
    d = x.shape[-1]
    return F.layer_norm(x, (d,), module.weight[:d], module.bias[:d], module.eps)


def _linear(module: nn.Linear, x: torch.Tensor, out_features: int) -> torch.Tensor:
    """``x @ W[:out, :in].T + b[:out]`` with ``in`` taken from ``x``."""
    return F.linear(x, module.weight[:out_features, : x.shape[-1]], module.bias[:out_features])


@dataclass(frozen=True)
class _HeadSlice:
    """Which rows of a head-structured projection an architecture uses."""

    heads: int       # heads used
    head_dims: int   # dims used per head
    max_heads: int
    max_head_dims: int

    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        """(max_heads*max_head_dims, ...) -> (heads*head_dims, ...): the used rows, head by head."""
        per_head = weight.view(self.max_heads, self.max_head_dims, *weight.shape[1:])
        return per_head[: self.heads, : self.head_dims].reshape(self.heads * self.head_dims, *weight.shape[1:])

    def columns(self, weight: torch.Tensor, out_features: int) -> torch.Tensor:
        """(out_max, max_heads*max_head_dims) -> (out, heads*head_dims): input columns of W_o."""
        per_head = weight.view(weight.shape[0], self.max_heads, self.max_head_dims)
        return per_head[:out_features, : self.heads, : self.head_dims].reshape(out_features, -1)


def head_slice(config: SuperBertConfig, arch: Arch) -> _HeadSlice:
    max_heads, max_dims = config.num_attention_heads, config.head_size
    if config.search_space.mode == "mlm":
        return _HeadSlice(arch.num_attention_heads, max_dims, max_heads, max_dims)
    # kd: every head kept, each trimmed (official SuperBERT KD slicing)
    return _HeadSlice(max_heads, arch.qkv_size // max_heads, max_heads, max_dims)


# --- modules (names mirror transformers' BertModel) -----------------------------------------
class _Container(nn.Module):
    """A named holder of submodules, so parameter names match BERT's (no forward of its own)."""

    def __init__(container, /, **children: nn.Module) -> None:  # noqa: N805 - BERT has a child named "self"
        super().__init__()
        for name, child in children.items():
            container.add_module(name, child)


class SuperBertEmbeddings(nn.Module):
    def __init__(self, config: SuperBertConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, d, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, d)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, d)
        self.LayerNorm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None, d_model: int) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        if seq_len > self.position_embeddings.num_embeddings:
            raise UserError(f"sequence length {seq_len} exceeds max_position_embeddings "
                            f"{self.position_embeddings.num_embeddings}; truncate the input")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        positions = torch.arange(seq_len, device=input_ids.device)[None, :]
        embeddings = (
            F.embedding(input_ids, self.word_embeddings.weight[:, :d_model])
            + F.embedding(positions, self.position_embeddings.weight[:, :d_model])
            + F.embedding(token_type_ids, self.token_type_embeddings.weight[:, :d_model])
        )  # (B, T, d_m)
        return self.dropout(_layer_norm(self.LayerNorm, embeddings))


class SuperBertLayer(nn.Module):
    def __init__(self, config: SuperBertConfig) -> None:
        super().__init__()
        d, f, q = config.hidden_size, config.intermediate_size, config.qkv_size
        eps = config.layer_norm_eps
        self.attention = _Container(
            self=_Container(query=nn.Linear(d, q), key=nn.Linear(d, q), value=nn.Linear(d, q)),
            output=_Container(dense=nn.Linear(q, d), LayerNorm=nn.LayerNorm(d, eps=eps)),
        )
        self.intermediate = _Container(dense=nn.Linear(d, f))
        self.output = _Container(dense=nn.Linear(f, d), LayerNorm=nn.LayerNorm(d, eps=eps))
        self.act = ACT2FN[config.hidden_act]
        self.hidden_dropout = config.hidden_dropout_prob
        self.attention_dropout = config.attention_probs_dropout_prob

    def _project(self, linear: nn.Linear, x: torch.Tensor, heads: _HeadSlice) -> torch.Tensor:
        weight = heads.rows(linear.weight)[:, : x.shape[-1]]
        out = F.linear(x, weight, heads.rows(linear.bias))  # (B, T, h*d)
        batch, seq_len, _ = out.shape
        return out.view(batch, seq_len, heads.heads, heads.head_dims).transpose(1, 2)  # (B, h, T, d)

    def forward(self, x: torch.Tensor, arch: Arch, heads: _HeadSlice, additive_mask: torch.Tensor | None,
                want_scores: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn = self.attention.self
        query, key, value = (self._project(m, x, heads) for m in (attn.query, attn.key, attn.value))
        dropout = self.attention_dropout if self.training else 0.0
        scores = None
        if want_scores:
            # Pre-softmax scores, mask not added: what AutoTinyBERT-KD matches to the teacher.
            scores = query @ key.transpose(-1, -2) / math.sqrt(heads.head_dims)  # (B, h, T, T)
            masked = scores if additive_mask is None else scores + additive_mask
            context = F.dropout(masked.softmax(dim=-1), dropout, self.training) @ value
        else:
            context = F.scaled_dot_product_attention(query, key, value, attn_mask=additive_mask, dropout_p=dropout)
        batch, _, seq_len, _ = context.shape
        context = context.transpose(1, 2).reshape(batch, seq_len, -1)  # (B, T, h*d)

        d_model = x.shape[-1]
        out = self.attention.output
        attended = F.linear(context, heads.columns(out.dense.weight, d_model), out.dense.bias[:d_model])
        x = _layer_norm(out.LayerNorm, F.dropout(attended, self.hidden_dropout, self.training) + x)
        inner = self.act(_linear(self.intermediate.dense, x, arch.intermediate_size))  # (B, T, d_f)
        ffn = _linear(self.output.dense, inner, d_model)
        return _layer_norm(self.output.LayerNorm, F.dropout(ffn, self.hidden_dropout, self.training) + x), scores


@dataclass
class SuperBertOutput(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attention_scores: torch.Tensor | None = None  # last layer, pre-softmax, (B, H, T, T)


@dataclass
class SuperBertPreTrainingOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None          # (B, T, V), or (N_masked, V) with masked_only
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attention_scores: torch.Tensor | None = None
    fit_hidden_state: torch.Tensor | None = None  # KD fit layer applied to the last hidden state


class SuperBertPreTrainedModel(PreTrainedModel):
    config_class = SuperBertConfig
    base_model_prefix = "bert"

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, SuperBertForPreTraining):
            with torch.no_grad():
                module.cls.predictions.bias.zero_()

    def set_arch(self, arch: Arch | str | None) -> None:
        """Make ``forward`` run ``arch`` (checked against the space); None = the largest."""
        if arch is None:
            arch = self.config.search_space.largest()
        elif isinstance(arch, str):
            arch = Arch.parse(arch)
        self.config.search_space.check(arch)
        for module in self.modules():
            if isinstance(module, SuperBertPreTrainedModel):
                module.active_arch = arch

    @property
    def arch(self) -> Arch:
        return self.active_arch

    def sliced_state_dict(self, arch: Arch) -> dict[str, torch.Tensor]:
        """Weights of ``arch`` under `BertModel` names (``bert.`` prefix kept), as contiguous copies."""
        return _sliced_state_dict(self, arch)

    @classmethod
    def from_pretrained(cls, path: str | Path, *args: Any, **kwargs: Any):  # type: ignore[override]
        """Strict, pickle-free load of a SuperPLM directory (config.json + model.safetensors)."""
        if args or kwargs:
            raise TypeError("SuperPLM checkpoints load from a local directory only; no extra options")
        return load_supernet(path, cls)


class SuperBertModel(SuperBertPreTrainedModel):
    def __init__(self, config: SuperBertConfig, add_pooling_layer: bool = True) -> None:
        super().__init__(config)
        self.embeddings = SuperBertEmbeddings(config)
        self.encoder = _Container(layer=nn.ModuleList(SuperBertLayer(config) for _ in range(config.num_hidden_layers)))
        self.pooler = _Container(dense=nn.Linear(config.hidden_size, config.hidden_size)) if add_pooling_layer else None
        self.active_arch = config.search_space.largest()
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_attention_scores: bool = False,
    ) -> SuperBertOutput:
        arch = self.active_arch
        heads = head_slice(self.config, arch)
        x = self.embeddings(input_ids, token_type_ids, arch.hidden_size)
        additive_mask = None if attention_mask is None else additive_attention_mask(attention_mask, x.dtype)
        hidden_states = [x] if output_hidden_states else None
        scores = None
        last = arch.num_hidden_layers - 1
        for index, kept in enumerate(self.config.kept_layers(arch.num_hidden_layers)):
            x, layer_scores = self.encoder.layer[kept](x, arch, heads, additive_mask,
                                                       output_attention_scores and index == last)
            if layer_scores is not None:
                scores = layer_scores
            if output_hidden_states:
                hidden_states.append(x)
        pooled = None
        if self.pooler is not None:
            pooled = torch.tanh(_linear(self.pooler.dense, x[:, 0], arch.hidden_size))
        return SuperBertOutput(
            last_hidden_state=x,
            pooler_output=pooled,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attention_scores=scores,
        )


class SuperBertForPreTraining(SuperBertPreTrainedModel):
    """SuperPLM with the MLM head (tied to the word embeddings) and the optional KD fit layer."""

    def __init__(self, config: SuperBertConfig) -> None:
        super().__init__(config)
        d = config.hidden_size
        self.bert = SuperBertModel(config)
        self.cls = _Container(predictions=_Container(
            transform=_Container(dense=nn.Linear(d, d), LayerNorm=nn.LayerNorm(d, eps=config.layer_norm_eps)),
        ))
        self.cls.predictions.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.act = ACT2FN[config.hidden_act]
        # Fit layer of AutoTinyBERT-KD: student d_m -> teacher hidden, sliced on its input side.
        self.fit_dense = nn.Linear(d, config.teacher_hidden_size) if config.teacher_hidden_size else None
        self.active_arch = config.search_space.largest()
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.bert.embeddings.word_embeddings

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., d_m) -> (..., V) through the transform and the tied decoder."""
        head = self.cls.predictions
        d_model = hidden.shape[-1]
        transformed = _layer_norm(head.transform.LayerNorm,
                                  self.act(_linear(head.transform.dense, hidden, d_model)))
        return F.linear(transformed, self.bert.embeddings.word_embeddings.weight[:, :d_model], head.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_attention_scores: bool = False,
        masked_only: bool = True,
        compute_logits: bool = True,
    ) -> SuperBertPreTrainingOutput:
        """MLM forward. With ``labels`` and ``masked_only`` the vocabulary projection runs only
        at labelled positions (``labels != -100``) and ``logits`` is ``(N_masked, V)``."""
        out = self.bert(input_ids, attention_mask, token_type_ids, output_hidden_states, output_attention_scores)
        hidden = out.last_hidden_state
        logits = loss = None
        if labels is not None and masked_only:
            selected = labels != -100
            logits = self.mlm_logits(hidden[selected])  # (N_masked, V)
            loss = F.cross_entropy(logits, labels[selected]) if logits.shape[0] else hidden.sum() * 0.0
        elif compute_logits:
            logits = self.mlm_logits(hidden)
            if labels is not None:
                loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)
        return SuperBertPreTrainingOutput(
            loss=loss, logits=logits, last_hidden_state=hidden, hidden_states=out.hidden_states,
            attention_scores=out.attention_scores, fit_hidden_state=self.fit(hidden),
        )

    def fit(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The KD fit layer: (..., d_m) -> (..., teacher width), or None without a teacher width."""
        if self.fit_dense is None:
            return None
        return F.linear(hidden, self.fit_dense.weight[:, : hidden.shape[-1]], self.fit_dense.bias)


@dataclass
class SuperBertClassifierOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None          # (B, num_labels); (B, 1) for regression
    hidden_states: tuple[torch.Tensor, ...] | None = None


class SuperBertForSequenceClassification(SuperBertPreTrainedModel):
    """A SuperPLM with BERT's sequence-classification head: pooler -> dropout -> classifier, the
    classifier's input columns sliced to d_m. The task route's task-adapted SuperPLM: every
    sub-model inherits task weights, so it is scored with one pass over held-out task data.
    Names mirror `BertForSequenceClassification` (``bert.*``, ``classifier.*``)."""

    def __init__(self, config: SuperBertConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = SuperBertModel(config)
        dropout = getattr(config, "classifier_dropout", None)
        self.dropout = nn.Dropout(config.hidden_dropout_prob if dropout is None else dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.active_arch = config.search_space.largest()
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.bert.embeddings.word_embeddings

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                output_hidden_states: bool = False) -> SuperBertClassifierOutput:
        out = self.bert(input_ids, attention_mask, token_type_ids, output_hidden_states)
        pooled = self.dropout(out.pooler_output)  # (B, d_m)
        logits = F.linear(pooled, self.classifier.weight[:, : pooled.shape[-1]], self.classifier.bias)
        loss = None
        if labels is not None:  # BERT's rule: one output is regression (STS-B)
            loss = (F.mse_loss(logits.squeeze(-1), labels.float()) if self.num_labels == 1
                    else F.cross_entropy(logits, labels))
        return SuperBertClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


# --- slicing for export -------------------------------------------------------------------------
def _sliced_state_dict(model: SuperBertPreTrainedModel, arch: Arch) -> dict[str, torch.Tensor]:
    model.config.search_space.check(arch)
    bert = model if isinstance(model, SuperBertModel) else model.bert
    d, f = arch.hidden_size, arch.intermediate_size
    heads = head_slice(model.config, arch)
    state: dict[str, torch.Tensor] = {}

    def put(name: str, tensor: torch.Tensor) -> None:
        state[name] = tensor.detach().clone().contiguous()

    emb = bert.embeddings
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        put(f"bert.embeddings.{name}.weight", getattr(emb, name).weight[:, :d])
    put("bert.embeddings.LayerNorm.weight", emb.LayerNorm.weight[:d])
    put("bert.embeddings.LayerNorm.bias", emb.LayerNorm.bias[:d])
    for i, kept in enumerate(model.config.kept_layers(arch.num_hidden_layers)):
        layer, prefix = bert.encoder.layer[kept], f"bert.encoder.layer.{i}"  # renumbered 0..L-1 for export
        for name in ("query", "key", "value"):
            linear = getattr(layer.attention.self, name)
            put(f"{prefix}.attention.self.{name}.weight", heads.rows(linear.weight)[:, :d])
            put(f"{prefix}.attention.self.{name}.bias", heads.rows(linear.bias))
        out = layer.attention.output
        put(f"{prefix}.attention.output.dense.weight", heads.columns(out.dense.weight, d))
        put(f"{prefix}.attention.output.dense.bias", out.dense.bias[:d])
        put(f"{prefix}.attention.output.LayerNorm.weight", out.LayerNorm.weight[:d])
        put(f"{prefix}.attention.output.LayerNorm.bias", out.LayerNorm.bias[:d])
        put(f"{prefix}.intermediate.dense.weight", layer.intermediate.dense.weight[:f, :d])
        put(f"{prefix}.intermediate.dense.bias", layer.intermediate.dense.bias[:f])
        put(f"{prefix}.output.dense.weight", layer.output.dense.weight[:d, :f])
        put(f"{prefix}.output.dense.bias", layer.output.dense.bias[:d])
        put(f"{prefix}.output.LayerNorm.weight", layer.output.LayerNorm.weight[:d])
        put(f"{prefix}.output.LayerNorm.bias", layer.output.LayerNorm.bias[:d])
    if bert.pooler is not None:
        put("bert.pooler.dense.weight", bert.pooler.dense.weight[:d, :d])
        put("bert.pooler.dense.bias", bert.pooler.dense.bias[:d])
    if isinstance(model, SuperBertForPreTraining):
        head = model.cls.predictions
        put("cls.predictions.transform.dense.weight", head.transform.dense.weight[:d, :d])
        put("cls.predictions.transform.dense.bias", head.transform.dense.bias[:d])
        put("cls.predictions.transform.LayerNorm.weight", head.transform.LayerNorm.weight[:d])
        put("cls.predictions.transform.LayerNorm.bias", head.transform.LayerNorm.bias[:d])
        put("cls.predictions.bias", head.bias)
        # The decoder is tied: exported models hold the same tensors under their decoder names.
        state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"]
        state["cls.predictions.decoder.bias"] = state["cls.predictions.bias"]
    if isinstance(model, SuperBertForSequenceClassification):
        put("classifier.weight", model.classifier.weight[:, :d])
        put("classifier.bias", model.classifier.bias)
    return state


# --- construction -----------------------------------------------------------------------------
@contextlib.contextmanager
def _no_init():
    """Skip random initialisation when the weights are loaded right after (saves time)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x kept it here
        from transformers.modeling_utils import no_init_weights

    with no_init_weights():
        yield


def new_supernet(config: SuperBertConfig, seed: int = 0, cls: type[SuperBertPreTrainedModel] | None = None):
    """A freshly initialised SuperPLM (``cls``, default `SuperBertForPreTraining`); ``seed`` fixes the
    weights without touching global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = (cls or SuperBertForPreTraining)(config)
    return model


# --- reading a SuperPLM checkpoint directory (`checkpoint` writes them) -------------------------
CHECKPOINT_WEIGHTS = "model.safetensors"
# The class a checkpoint was saved from (config.json "architectures"): MLM / KD pre-training, or
# the task route's SuperPLM with a classification head.
_SUPERNET_CLASSES = {cls.__name__: cls for cls in (SuperBertForPreTraining, SuperBertForSequenceClassification)}
CHECKPOINT_CONFIG = "config.json"


def load_supernet(path: str | Path, cls: type[SuperBertPreTrainedModel] | None = None):
    """Load a SuperPLM directory strictly; any problem is a one-line `UserError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    config_file, weights_file = path / CHECKPOINT_CONFIG, path / CHECKPOINT_WEIGHTS
    if not path.is_dir():
        raise UserError(f"SuperPLM checkpoint {path} does not exist; pass the directory written by "
                        "'autotinybert pretrain' or 'autotinybert init'")
    for required in (config_file, weights_file):
        if not required.is_file():
            raise UserError(f"SuperPLM checkpoint {path} has no {required.name}; it is incomplete or not a SuperPLM")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{config_file} is corrupt ({err}); re-export or re-train the SuperPLM") from None
    if raw.get("model_type") != SuperBertConfig.model_type:
        raise UserError(f"{path} holds a {raw.get('model_type')!r} model, not a SuperPLM "
                        f"({SuperBertConfig.model_type!r})")
    cls = cls or _SUPERNET_CLASSES.get((raw.get("architectures") or [""])[0], SuperBertForPreTraining)
    try:
        config = SuperBertConfig.from_dict(raw)
    except (UserError, TypeError, ValueError) as err:
        raise UserError(f"{config_file} is not a valid SuperPLM config: {err}") from None
    try:
        state = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{weights_file} is corrupt ({err}); re-download or re-train the SuperPLM") from None
    with _no_init():
        model = cls(config)
    expected = model.state_dict()
    if cls is SuperBertModel:  # a bare encoder loads from a pre-training checkpoint too
        state = {k[len("bert."):]: v for k, v in state.items() if k.startswith("bert.")}
    problems = _state_mismatch(expected, state)
    if problems:
        raise UserError(f"{weights_file} does not match its config.json ({problems}); the checkpoint is "
                        "corrupt or its vocab_size / space was edited")
    model.load_state_dict(state, strict=True)
    _check_tokenizer_vocab(path, config.vocab_size)
    model.eval()
    return model


def _state_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [k for k in expected if k in found and tuple(expected[k].shape) != tuple(found[k].shape)]
    parts = []
    if missing:
        parts.append(f"missing {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    if unexpected:
        parts.append(f"unexpected {unexpected[0]}" + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""))
    if shapes:
        k = shapes[0]
        parts.append(f"{k} has shape {tuple(found[k].shape)}, expected {tuple(expected[k].shape)}")
    return "; ".join(parts)


def _check_tokenizer_vocab(path: Path, vocab_size: int) -> None:
    """A tokenizer saved beside the weights must not produce ids beyond the embedding table."""
    size, source = tokenizer_vocab_size(path)
    if size is not None and size > vocab_size:
        raise UserError(f"{source} has {size} tokens but the SuperPLM's vocab_size is {vocab_size}; "
                        "the tokenizer belongs to another model")


def tokenizer_vocab_size(path: Path) -> tuple[int | None, Path | None]:
    """Token count of the tokenizer files in ``path`` (tokenizer.json, else vocab.txt), read cheaply."""
    fast, vocab_file = path / "tokenizer.json", path / "vocab.txt"
    try:
        if fast.is_file():
            data = json.loads(fast.read_text(encoding="utf-8"))
            added = {token["id"] for token in data.get("added_tokens", [])}
            return len(set(data["model"]["vocab"].values()) | added), fast
        if vocab_file.is_file():
            with vocab_file.open(encoding="utf-8") as handle:
                return sum(1 for _ in handle), vocab_file
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise UserError(f"tokenizer files in {path} are corrupt ({err}); replace them") from None
    return None, None
