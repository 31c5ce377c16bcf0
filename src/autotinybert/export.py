"""Elastic -> static: turn one architecture of a SuperPLM into an ordinary Hugging Face model.

* Stock ``BertForMaskedLM`` / ``BertModel`` (``model_type: "bert"``) whenever BERT can represent
  the architecture (``qkv_size == hidden_size``, heads dividing it).
* Otherwise the registered ``autotinybert`` type (`autotinybert.hf`); its two source files are
  written next to the weights with an ``auto_map``, so
  ``AutoModelForMaskedLM.from_pretrained(path, trust_remote_code=True)`` works on machines that
  never installed autotinybert (the official code needed a patched ``BertSelfAttention``).

`verify_export` is the specification: sliced SuperPLM == extracted model == reloaded checkpoint
== reloaded without autotinybert == ONNX Runtime, on random padded inputs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel, PreTrainedModel

from . import hf
from .errors import UserError
from .checkpoint import load_supernet, load_tokenizer
from .deploy import export_onnx, onnx_output_names, random_inputs  # noqa: F401  (live in deploy; importable here too)
from .modeling import SuperBertForSequenceClassification, SuperBertModel, SuperBertPreTrainedModel
from .space import Arch, parameter_count

ONNX_FILE = "model.onnx"
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json")


def export_config(supernet: SuperBertPreTrainedModel, arch: Arch) -> BertConfig:
    """The Hugging Face config of ``arch``: stock BERT when representable, else `AutoTinyBertConfig`."""
    sc = supernet.config
    fields = dict(
        vocab_size=sc.vocab_size,
        hidden_size=arch.hidden_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        intermediate_size=arch.intermediate_size,
        hidden_act=sc.hidden_act,
        hidden_dropout_prob=sc.hidden_dropout_prob,
        attention_probs_dropout_prob=sc.attention_probs_dropout_prob,
        max_position_embeddings=sc.max_position_embeddings,
        type_vocab_size=sc.type_vocab_size,
        layer_norm_eps=sc.layer_norm_eps,
        initializer_range=sc.initializer_range,
        pad_token_id=sc.pad_token_id,
    )
    if sc.depth_layers is not None:  # which of the SuperPLM's layers this model's are (a depth order was chosen)
        fields["superplm_layers"] = {"of": sc.num_hidden_layers, "kept": list(sc.kept_layers(arch.num_hidden_layers))}
    if isinstance(supernet, SuperBertForSequenceClassification):  # the task head's labels travel along
        fields.update(num_labels=sc.num_labels, id2label=sc.id2label, label2id=sc.label2id, problem_type=sc.problem_type)
    if arch.is_bert_compatible:
        return BertConfig(**fields)
    config = hf.AutoTinyBertConfig(qkv_size=arch.qkv_size, **fields)
    config.auto_map = dict(hf.AUTO_MAP)
    return config


def extract(supernet: SuperBertPreTrainedModel, arch: Arch | str | None = None, *,
            encoder_only: bool = False) -> PreTrainedModel:
    """Copy ``arch``'s slice of ``supernet`` into a standalone transformers model (eval mode).

    Returns ``BertForMaskedLM`` / ``AutoTinyBertForMaskedLM`` (a task-adapted SuperPLM gives
    ``BertForSequenceClassification`` / ``AutoTinyBertForSequenceClassification`` with its head), or
    the bare encoder (``BertModel`` / ``AutoTinyBertModel``, pooler included) with ``encoder_only``.
    """
    if arch is None:
        arch = supernet.arch
    elif isinstance(arch, str):
        arch = Arch.parse(arch)
    supernet.config.search_space.check(arch)
    if not encoder_only and isinstance(supernet, SuperBertModel):
        raise UserError("a bare SuperBertModel has no head; extract with encoder_only=True")
    config = export_config(supernet, arch)
    stock = arch.is_bert_compatible
    state = supernet.sliced_state_dict(arch)
    if encoder_only:
        model_class = BertModel if stock else hf.AutoTinyBertModel
        state = {k[len("bert."):]: v for k, v in state.items() if k.startswith("bert.")}
    elif isinstance(supernet, SuperBertForSequenceClassification):
        model_class = BertForSequenceClassification if stock else hf.AutoTinyBertForSequenceClassification
    else:
        model_class = BertForMaskedLM if stock else hf.AutoTinyBertForMaskedLM
        state = {k: v for k, v in state.items() if not k.startswith("bert.pooler.")}
    model = model_class(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def save_export(model: PreTrainedModel, out_dir: str | Path, tokenizer=None) -> None:
    """``save_pretrained`` (which, for the non-stock type, also writes the modeling files named in
    ``auto_map``; see `autotinybert.hf`) plus the tokenizer."""
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir))
    if model.config.model_type == hf.AutoTinyBertConfig.model_type:
        missing = [source.name for source in hf.SOURCE_FILES if not (out_dir / source.name).is_file()]
        if missing:  # would load only where autotinybert is installed: refuse rather than ship it
            raise RuntimeError(f"save_pretrained did not write {missing} to {out_dir}")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))


# --- ONNX ------------------------------------------------------------------------------------
def run_onnx(path: str | Path, inputs: dict[str, torch.Tensor], threads: int | None = None) -> torch.Tensor:
    """The first output of the ONNX graph at ``path`` on ``inputs``, with ONNX Runtime (CPU)."""
    from .deploy import OnnxTaskModel

    return next(iter(vars(OnnxTaskModel(path, threads)(**inputs)).values()))


# --- verification ----------------------------------------------------------------------------------
def _model_output(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    if hasattr(out, "logits") and out.logits is not None:
        return out.logits
    return out.last_hidden_state


def _supernet_reference(supernet: SuperBertPreTrainedModel, arch: Arch, inputs: dict[str, torch.Tensor],
                        encoder_only: bool) -> torch.Tensor:
    """The sliced SuperPLM's output for ``inputs``: the last hidden state, MLM logits or task logits."""
    previous, was_training = supernet.arch, supernet.training
    supernet.set_arch(arch)
    supernet.eval()
    try:
        with torch.no_grad():
            if encoder_only:
                bert = supernet if isinstance(supernet, SuperBertModel) else supernet.bert
                return bert(**inputs).last_hidden_state
            if isinstance(supernet, SuperBertForSequenceClassification):
                return supernet(**inputs).logits
            return supernet(**inputs, masked_only=False).logits
    finally:
        supernet.set_arch(previous)
        supernet.train(was_training)


_ISOLATED_LOADER = r"""
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "autotinybert" or name.startswith("autotinybert."):
            raise ImportError("autotinybert is deliberately unavailable in this process")
sys.meta_path.insert(0, _Block())
import torch, transformers
from safetensors.torch import load_file, save_file
model_dir, inputs_file, output_file, encoder_only, auto_name = sys.argv[1:6]
auto = getattr(transformers, auto_name)
model = auto.from_pretrained(model_dir, trust_remote_code=True).eval()
assert not any(m.startswith("autotinybert") for m in sys.modules), "autotinybert was imported"
with torch.no_grad():
    out = model(**load_file(inputs_file))
tensor = out.logits if encoder_only != "1" else out.last_hidden_state
save_file({"output": tensor.contiguous()}, output_file)
"""


def _auto_class_name(model_dir: str | Path, encoder_only: bool) -> str:
    """The transformers Auto class that loads an exported folder: by its saved architecture."""
    if encoder_only:
        return "AutoModel"
    import json

    architectures = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8")).get("architectures") or [""]
    return "AutoModelForSequenceClassification" if architectures[0].endswith("ForSequenceClassification") \
        else "AutoModelForMaskedLM"


def run_isolated(model_dir: str | Path, inputs: dict[str, torch.Tensor], encoder_only: bool) -> torch.Tensor:
    """Load ``model_dir`` in a fresh Python where importing autotinybert fails, and run ``inputs``."""
    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory() as tmp:
        inputs_file, output_file = Path(tmp) / "inputs.safetensors", Path(tmp) / "output.safetensors"
        save_file({k: v.contiguous() for k, v in inputs.items()}, str(inputs_file))
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(Path(tmp) / "modules"))
        result = subprocess.run(
            [sys.executable, "-c", _ISOLATED_LOADER, str(Path(model_dir).resolve()), str(inputs_file), str(output_file),
             "1" if encoder_only else "0", _auto_class_name(model_dir, encoder_only)],
            capture_output=True, text=True, env=env, cwd=tmp, timeout=600,
        )
        if result.returncode != 0:
            raise RuntimeError(f"loading {model_dir} without autotinybert failed:\n{result.stderr[-3000:]}")
        return load_file(str(output_file))["output"]


def verify_export(supernet: SuperBertPreTrainedModel, arch: Arch | str, export_dir: str | Path | None = None, *,
                  encoder_only: bool = False, onnx_path: str | Path | None = None, isolated: bool = True,
                  batch: int = 3, seq_len: int = 19, seed: int = 0) -> dict[str, float]:
    """Max |difference| between the sliced SuperPLM and every form of the exported model.

    Keys: ``extracted`` (in memory), ``reloaded`` (``from_pretrained`` of ``export_dir``),
    ``isolated`` (reloaded in a subprocess that cannot import autotinybert), ``onnx``.
    """
    import transformers

    arch = Arch.parse(arch) if isinstance(arch, str) else arch
    seq_len = min(seq_len, supernet.config.max_position_embeddings)
    inputs = random_inputs(supernet.config.vocab_size, batch, seq_len, seed, supernet.config.type_vocab_size)
    reference = _supernet_reference(supernet, arch, inputs, encoder_only)

    def diff(tensor: torch.Tensor) -> float:
        return (tensor.float() - reference.float()).abs().max().item()

    report = {"extracted": diff(_model_output(extract(supernet, arch, encoder_only=encoder_only), inputs))}
    if export_dir is not None:
        auto = getattr(transformers, _auto_class_name(export_dir, encoder_only))
        reloaded = auto.from_pretrained(str(export_dir), trust_remote_code=True).eval()
        report["reloaded"] = diff(_model_output(reloaded, inputs))
        if isolated:
            report["isolated"] = diff(run_isolated(export_dir, inputs, encoder_only))
    if onnx_path is not None:
        report["onnx"] = diff(run_onnx(onnx_path, inputs))
    return report


# --- the `extract` command -----------------------------------------------------------------------
def int8_agreement(reference: torch.Tensor, quantized: torch.Tensor) -> dict[str, float]:
    """How far an int8 form's outputs are from fp32: max / mean |difference|, the mean relative to
    mean |fp32|, and the share of positions whose arg-max (e.g. MLM token) agrees."""
    reference, quantized = reference.float(), quantized.float()
    diff = (quantized - reference).abs()
    return {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(),
            "relative_mean_diff": (diff.mean() / reference.abs().mean().clamp_min(1e-12)).item(),
            "argmax_agreement": (quantized.argmax(-1) == reference.argmax(-1)).float().mean().item()}


def export_checkpoint(supernet_dir: str | Path, arch: str | Arch, out_dir: str | Path, *, encoder_only: bool = False,
                      onnx: bool = False, onnx_optimize: bool = False, onnx_int8: bool = False, verify: bool = True,
                      overwrite: bool = False, tolerance: float = 1e-4, isolated: bool = True,
                      arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    """Extract ``arch`` from a SuperPLM directory into ``out_dir`` (written whole or not at all).

    ONNX forms: ``onnx`` model.onnx; ``onnx_optimize`` adds model.opt.onnx (verified like fp32);
    ``onnx_int8`` adds model.opt.int8.onnx, whose agreement with fp32 (and torch dynamic int8's)
    is reported under ``int8_agreement`` rather than held to ``tolerance``.
    """
    from .deploy import FORM_FILES, fusion_counts, onnx_forms

    from .files import atomic_write_json, staged_directory, write_stage_config

    arch = Arch.parse(arch) if isinstance(arch, str) else arch
    supernet = load_supernet(supernet_dir)
    supernet.config.search_space.check(arch)
    tokenizer = load_tokenizer(supernet_dir) if any((Path(supernet_dir) / f).is_file() for f in TOKENIZER_FILES) else None
    model = extract(supernet, arch, encoder_only=encoder_only)
    summary: dict[str, Any] = {
        "arch": str(arch),
        "arch_fields": arch.to_dict(),
        "model_type": model.config.model_type,
        "model_class": type(model).__name__,
        "parameters": parameter_count(arch, supernet.config.vocab_size, supernet.config.max_position_embeddings,
                                      supernet.config.type_vocab_size, mlm_head=not encoder_only,
                                      pooler=encoder_only),
        "supernet": str(supernet_dir),
        "tokenizer": tokenizer is not None,
    }
    forms = ("fp32",) + (("optimized",) if onnx_optimize or onnx_int8 else ()) + (("int8",) if onnx_int8 else ())
    with staged_directory(out_dir, overwrite) as tmp:
        save_export(model, tmp, tokenizer)
        paths = onnx_forms(model, tmp, forms) if onnx or len(forms) > 1 else {}
        if len(paths) > 1:
            summary["onnx_forms"] = {form: {"file": FORM_FILES[form], "operators": fusion_counts(path)}
                                     for form, path in paths.items()}
        if verify:
            report = verify_export(supernet, arch, tmp, encoder_only=encoder_only, onnx_path=paths.get("fp32"),
                                   isolated=isolated)
            if "optimized" in paths:
                inputs = random_inputs(supernet.config.vocab_size, type_vocab_size=supernet.config.type_vocab_size)
                reference = _model_output(model, inputs)
                report["onnx_optimized"] = (run_onnx(paths["optimized"], inputs) - reference).abs().max().item()
                if "int8" in paths:
                    from .deploy import quantize_torch

                    summary["int8_agreement"] = {
                        "onnxruntime": int8_agreement(reference, run_onnx(paths["int8"], inputs)),
                        "torch": int8_agreement(reference, _model_output(quantize_torch(model), inputs))}
            summary["max_abs_diff"] = report
            worst = max(report.values())
            if not worst <= tolerance:  # also catches NaN
                raise RuntimeError(f"exported model differs from the SuperPLM by {worst:.3g} (> {tolerance}): {report}")
        if arguments is not None:
            write_stage_config(tmp, arguments)
        atomic_write_json(tmp / "results.json", summary)
    return summary

