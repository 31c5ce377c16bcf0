"""A SuperPLM that starts from a pre-trained BERT-family checkpoint (`autotinybert init --from`).

The paper pre-trains its SuperPLM from random weights (GPU-days). Starting from a pre-trained
model is what DynaBERT, Minitron and whittle do: the source *is* the largest sub-model, its units
are reordered by importance (`importance`) so that first-k slices keep what matters, and one-shot
training then distils the source into every sub-model.

* Space: bounded by the source — layers, hidden and FFN up to the source's; mlm mode: whole heads
  of the source's head size (``qkv = head_size * heads``); kd mode: the source's head count, each
  head sliced to ``qkv / heads`` of its dims.
* Weights: BERT's names (``bert.*``, ``cls.predictions.*``) are the SuperPLM's, so the copy is a
  strict ``load_state_dict``. A source without an MLM head (a `BertModel`, e.g. all-MiniLM-L6-v2)
  gets a new head tied to its word embeddings (config ``init_from.mlm_head = "new"``); the kd
  mode's fit layer starts as the identity (the largest sub-model fits the source exactly).
* Which checkpoints: ``model_type: bert`` — BERT, MiniLM-style and other `BertModel` /
  `BertForMaskedLM` / `BertForPreTraining` checkpoints, local or on the hub. Other families
  (RoBERTa's position offsets, ALBERT's sharing, DistilBERT's names) are refused with one line.
* Check: the largest sub-model's hidden states equal the (reordered) source's, recorded in
  ``results.json`` (``max_abs_diff``), an error above 1e-4.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from . import importance
from .errors import UserError
from .modeling import SuperBertConfig, SuperBertForPreTraining, new_supernet
from .space import Dim, SearchSpace

MAX_DIFF = 1e-4


def load_source(source: str | Path, seed: int = 0):
    """(model, tokenizer, has_mlm_head): the source as a stock `BertForPreTraining` in eval mode.

    Missing heads are initialised from ``seed`` without touching the global random state.
    """
    from transformers import AutoConfig, AutoTokenizer, BertForPreTraining

    from .builtin_data import resolve_model

    source = resolve_model(str(source))
    try:
        config = AutoConfig.from_pretrained(str(source))  # never runs code from the folder
        tokenizer = AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as err:
        raise UserError(f"--from {source}: not a loadable checkpoint ({str(err).splitlines()[0]}); give a "
                        "local folder with config.json, weights and tokenizer files, or a hub name") from None
    if config.model_type != "bert":
        raise UserError(f"--from {source}: model_type {config.model_type!r} is not supported; give a BERT-family "
                        "checkpoint (model_type bert: BERT, MiniLM, ...)")
    if config.hidden_size % config.num_attention_heads:
        raise UserError(f"--from {source}: hidden size {config.hidden_size} is not a multiple of its "
                        f"{config.num_attention_heads} heads")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, info = BertForPreTraining.from_pretrained(str(source), output_loading_info=True)
    missing = set(info["missing_keys"])
    has_mlm_head = not any(k.startswith("cls.predictions.transform") for k in missing)
    if any(k.startswith("bert.encoder") or k.startswith("bert.embeddings") for k in missing):
        raise UserError(f"--from {source}: the checkpoint lacks encoder weights ({sorted(missing)[0]}, ...)")
    return model.eval(), tokenizer, has_mlm_head


def _dim(largest: int, floor: int, step: int) -> Dim:
    """A range ending exactly at the source's size, starting near ``floor`` on the ``step`` grid."""
    if largest <= floor:
        return Dim(largest, largest, 1)
    return Dim(largest - step * ((largest - floor) // step), largest, step)


def space_of_source(source: str, mode: str) -> SearchSpace:
    """The space ``source`` bounds, from its config alone (no weights loaded)."""
    from transformers import AutoConfig

    from .builtin_data import resolve_model

    try:
        return source_space(AutoConfig.from_pretrained(resolve_model(source)), mode)
    except (OSError, ValueError) as err:
        raise UserError(f"init_from {source}: not a loadable checkpoint ({str(err).splitlines()[0]})") from None


def source_space(config, mode: str) -> SearchSpace:
    """The space a source bounds (hidden/FFN on a step-4 grid ending at the source's sizes; kd: at
    least 15/64 of each head, the paper's 180 of BERT-base's 768)."""
    shape = importance.Shape.of(config)
    # Floors: the paper's 128, or a third of a smaller source's size.
    common = dict(layers=Dim(1, shape.layers), hidden=_dim(shape.hidden, min(128, shape.hidden // 3), 4),
                  ffn=_dim(config.intermediate_size, min(128, config.intermediate_size // 3), 4))
    if mode == "mlm":
        return SearchSpace(mode="mlm", heads=Dim(1, shape.heads), head_size=shape.head_dim, **common)
    per_head_min = max(1, (15 * shape.head_dim) // 64)  # the paper's 180 of 768 for BERT-base
    return SearchSpace(mode="kd", heads=Dim(shape.heads, shape.heads),
                       qkv=Dim(shape.heads * per_head_min, shape.heads * shape.head_dim, shape.heads), **common)


def calibration_batches(tokenizer, texts: list[str], seq_len: int, batch_size: int = 16) -> list[dict]:
    batches = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], truncation=True, max_length=seq_len, padding=True,
                        return_tensors="pt")
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return batches


def calibration_texts(corpus: list[str] | None, sequences: int, seed: int) -> tuple[list[str], str]:
    """``sequences`` documents drawn with ``seed`` from the corpus (default: the docstrings of this
    Python's standard library, see `builtin_data`), and a description for the config."""
    from . import builtin_data
    from .data import corpus_files

    if corpus:
        documents = []
        for path in corpus_files(corpus):
            text = _read_text(path)
            documents += [" ".join(d.split()) for d in text.split("\n\n") if d.strip()]
        described = ", ".join(map(str, corpus))
    else:
        documents = [" ".join(builtin_data.docstring_sentences(_read_text(f))) for f in builtin_data.stdlib_files()]
        documents = [d for d in documents if d]
        described = builtin_data.CORPUS
    if not documents:
        raise UserError("the calibration corpus holds no text; give --calibration-corpus FILES")
    chosen = random.Random(seed).sample(documents, min(sequences, len(documents)))
    return chosen, described


def _read_text(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; give plain-text corpus files") from None


def build_superplm(source_model, has_mlm_head: bool, mode: str, orders: importance.Orders,
                   seed: int = 0) -> SuperBertForPreTraining:
    """The SuperPLM holding the source's weights in ``orders`` (its largest sub-model = the source)."""
    config = source_model.config
    space = source_space(config, mode)
    super_config = SuperBertConfig.from_space(
        space, vocab_size=config.vocab_size, max_position_embeddings=config.max_position_embeddings,
        type_vocab_size=config.type_vocab_size, hidden_act=config.hidden_act, layer_norm_eps=config.layer_norm_eps,
        hidden_dropout_prob=config.hidden_dropout_prob, initializer_range=config.initializer_range,
        attention_probs_dropout_prob=config.attention_probs_dropout_prob, pad_token_id=config.pad_token_id or 0,
        teacher_hidden_size=config.hidden_size if mode == "kd" else None)
    model = new_supernet(super_config, seed)
    source = importance.permute(source_model.state_dict(), importance.Shape.of(config), orders)
    state = model.state_dict()
    for name in state:
        if name in source and (has_mlm_head or not name.startswith("cls.predictions")):
            state[name] = source[name].clone()
    if model.fit_dense is not None:  # the fit layer maps the student's hidden state onto the source's:
        d = config.hidden_size       # identity on the source's (reordered) channels, back to its order
        state["fit_dense.weight"] = torch.eye(d)[:, orders.hidden] if orders.hidden is not None else torch.eye(d)
        state["fit_dense.bias"] = torch.zeros(d)
    model.load_state_dict(state, strict=True)
    return model.eval()


@torch.no_grad()
def max_abs_diff(source_model, superplm: SuperBertForPreTraining, orders: importance.Orders,
                 batch: dict[str, torch.Tensor], has_mlm_head: bool) -> dict[str, float]:
    """How far the largest sub-model is from the source on ``batch`` (hidden states, and MLM logits
    when the source brought its head)."""
    superplm.set_arch(superplm.config.search_space.largest())
    mask = batch["attention_mask"].bool()
    expected = source_model(**batch, output_hidden_states=True)
    got = superplm(batch["input_ids"], batch["attention_mask"], output_hidden_states=True, masked_only=False)
    hidden = expected.hidden_states[-1]
    if orders.hidden is not None:
        hidden = hidden[..., orders.hidden]
    diffs = {"hidden_states": float((hidden - got.last_hidden_state)[mask].abs().max())}
    if has_mlm_head:
        diffs["mlm_logits"] = float((expected.prediction_logits - got.logits)[mask].abs().max())
    if got.fit_hidden_state is not None:
        diffs["fit_layer"] = float((expected.hidden_states[-1] - got.fit_hidden_state)[mask].abs().max())
    return diffs


def superplm_from_source(source: str | Path, mode: str = "mlm", method: str = "activation",
                         calibration: list[str] | None = None, sequences: int = 256, seq_len: int = 128,
                         seed: int = 0) -> tuple[SuperBertForPreTraining, Any, dict[str, Any]]:
    """(SuperPLM, tokenizer, summary) built from ``source`` (see the module docstring)."""
    if method not in importance.METHODS:
        raise UserError(f"--importance must be one of {', '.join(importance.METHODS)}; got {method!r}")
    model, tokenizer, has_mlm_head = load_source(source, seed)
    shape = importance.Shape.of(model.config)
    seq_len = min(seq_len, model.config.max_position_embeddings)  # the source reads no longer inputs
    texts, described = calibration_texts(calibration, sequences, seed) if method == "activation" else ([], None)
    if method == "activation":
        batches = calibration_batches(tokenizer, texts, seq_len)
        orders = importance.activation_scores(model, batches, shape).orders(mode)
    elif method == "weight":
        orders = importance.weight_scores(model.state_dict(), shape).orders(mode)
    else:
        orders = importance.Orders()
    superplm = build_superplm(model, has_mlm_head, mode, orders, seed)
    check = calibration_batches(tokenizer, texts[:8] or ["a short check sentence for the copied weights ."], seq_len)[0]
    diffs = max_abs_diff(model, superplm, orders, check, has_mlm_head)
    if max(diffs.values()) > MAX_DIFF:
        raise RuntimeError(f"the SuperPLM's largest sub-model differs from the source by {diffs}")
    record = {"source": str(source), "mode": mode, "importance": method, "mlm_head": "source" if has_mlm_head else "new",
              "calibration": {"corpus": described, "sequences": len(texts), "seq_len": seq_len, "seed": seed}
              if method == "activation" else None}
    superplm.config.init_from = record
    summary = {**record, "largest": str(superplm.config.search_space.largest()), "max_abs_diff": diffs,
               "parameters": sum(p.numel() for p in superplm.parameters()), "vocab_size": superplm.config.vocab_size}
    return superplm, tokenizer, summary


def init_from_source(settings, arguments: dict | None = None) -> dict[str, Any]:
    """The `init --from` command: write the SuperPLM, the source's tokenizer and results.json to
    ``settings.out`` (staged: the folder appears complete or not at all)."""
    from .checkpoint import save_supernet
    from .files import atomic_write_json, staged_directory, write_stage_config

    clashing = [flag for flag, value in (("--space", settings.space != "paper-mlm"), ("--tokenizer", settings.tokenizer),
                                         ("--vocab-size", settings.vocab_size),
                                         ("--teacher-hidden-size", settings.teacher_hidden_size)) if value]
    if clashing:
        raise UserError(f"--from takes the space, tokenizer and sizes from the source; drop {', '.join(clashing)}")
    superplm, tokenizer, summary = superplm_from_source(
        settings.source, settings.mode, settings.importance, settings.calibration_corpus,
        settings.calibration_sequences, settings.calibration_seq_len, settings.seed)
    with staged_directory(settings.out, settings.overwrite) as tmp:
        save_supernet(superplm, tmp)
        tokenizer.save_pretrained(str(tmp))
        if arguments is not None:
            write_stage_config(tmp, arguments)
        atomic_write_json(tmp / "results.json", summary)
    return summary
