"""The forms a model ships in: ONNX Runtime's transformer optimiser, dynamic int8 (ONNX Runtime, torch).

What a user ships to a CPU is usually an ONNX Runtime graph after the transformer optimiser
(``onnxruntime.transformers.optimizer.optimize_model``: fused ``Attention``,
``EmbedLayerNormalization``, ``SkipLayerNormalization``, ``BiasGelu``), dynamically quantised to
int8 (``onnxruntime.quantization.quantize_dynamic``: int8 weights, activations quantised per call).
Eager users get ``torch.ao.quantization.quantize_dynamic`` on the ``nn.Linear`` layers.

Which fusions apply (counted by `fusion_counts`, tests/test_deploy.py, docs/latency.md):

* our ``autotinybert`` type (``qkv_size != hidden_size``): all of them; the optimiser reads the
  attention width from the Q/K/V weights, so we pass ``qkv_size`` as its ``hidden_size``;
* stock ``bert``: all of them when traced through eager attention (`export_onnx` does that),
  none of ``Attention`` / ``EmbedLayerNormalization`` when traced through transformers' SDPA
  attention (``fusable=False``).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Iterator

import torch

from .errors import UserError
from .settings import ONNX_FORMS

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Fused / quantised operators worth counting in an optimised graph.
FUSED_OPS = ("Attention", "MultiHeadAttention", "EmbedLayerNormalization", "SkipLayerNormalization",
             "LayerNormalization", "BiasGelu", "FastGelu", "Gelu", "QAttention", "DynamicQuantizeMatMul",
             "MatMulInteger", "DynamicQuantizeLinear", "MatMul")
# Files of each ONNX form next to a model (`onnx_forms`).
FORM_FILES = dict(zip(ONNX_FORMS, ("model.onnx", "model.opt.onnx", "model.opt.int8.onnx")))


def _needs_onnxruntime() -> None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise UserError("ONNX Runtime forms need the onnx extra: pip install 'autotinybert[onnx]'") from None


def attention_shape(config: Any) -> tuple[int, int]:
    """(heads, q/k/v width) as ONNX Runtime's attention fusion must be told them: the width of the
    Q/K/V projections (``qkv_size`` for our type), not ``hidden_size``."""
    return config.num_attention_heads, getattr(config, "qkv_size", None) or config.hidden_size


@contextlib.contextmanager
def _quiet_onnxruntime_tools() -> Iterator[None]:
    """The optimiser and quantiser log advice per node through `logging` and warnings."""
    loggers = [logging.getLogger(name) for name in ("onnxruntime", "fusion_base", "onnx_model", "root")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def optimize_onnx(src: str | Path, dst: str | Path, config: Any) -> Path:
    """ONNX Runtime's transformer optimiser (``model_type="bert"``) on ``src``; writes ``dst``."""
    _needs_onnxruntime()
    from onnxruntime.transformers.optimizer import optimize_model

    heads, width = attention_shape(config)
    with _quiet_onnxruntime_tools():
        # opt_level 0: only the transformer fusions here; the session applies ORT's own graph
        # optimisations when it loads the file (as it does for every form).
        model = optimize_model(str(src), model_type="bert", num_heads=heads, hidden_size=width, opt_level=0,
                               use_gpu=False)
        model.save_model_to_file(str(dst))
    return Path(dst)


def quantize_onnx(src: str | Path, dst: str | Path) -> Path:
    """Dynamic int8 quantisation (int8 weights; activations quantised at run time) of ``src``."""
    _needs_onnxruntime()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import onnx

    with _quiet_onnxruntime_tools():
        # Shape inference cannot type the outputs of fused contrib ops (Attention ...); they are float.
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return Path(dst)


def quantize_torch(model):
    """torch dynamic int8 of every ``nn.Linear`` (a copy; eager deployment, CPU)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.ao.quantization: moving to torchao
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=False)


def fusion_counts(path: str | Path) -> dict[str, int]:
    """How many of each `FUSED_OPS` operator the graph in ``path`` holds (absent ones omitted)."""
    import onnx

    counts = collections.Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)
    return {op: counts[op] for op in FUSED_OPS if counts[op]}


# --- ONNX ------------------------------------------------------------------------------------
def random_inputs(vocab_size: int, batch: int = 3, seq_len: int = 19, seed: int = 0,
                  type_vocab_size: int = 2) -> dict[str, torch.Tensor]:
    """Random ids with ragged right padding and mixed token types (padding bugs show up)."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab_size, (batch, seq_len), generator=gen)
    lengths = torch.randint(max(1, seq_len // 2), seq_len + 1, (batch,), generator=gen)
    lengths[0] = seq_len  # one full row
    attention_mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    input_ids = input_ids * attention_mask  # pad id 0
    split = torch.randint(1, seq_len, (batch, 1), generator=gen)
    token_type_ids = ((torch.arange(seq_len)[None, :] >= split).long() * attention_mask).clamp(max=type_vocab_size - 1)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


class _LogitsOnly(torch.nn.Module):
    """ONNX wants tensors out: the head's logits (two for question answering), or the last hidden
    state of a bare encoder."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        if getattr(out, "start_logits", None) is not None:
            return out.start_logits, out.end_logits
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def onnx_output_names(model: PreTrainedModel) -> list[str]:
    """``start_logits, end_logits`` for question answering, ``logits`` for a classifier, else ``output``."""
    name = type(model).__name__
    if name.endswith("ForQuestionAnswering"):
        return ["start_logits", "end_logits"]
    return ["logits"] if name.endswith("ForSequenceClassification") else ["output"]


@contextlib.contextmanager
def _eager_attention(model: PreTrainedModel):
    """Trace stock BERT with its eager attention: ONNX Runtime's transformer optimiser fuses that
    graph (Attention, EmbedLayerNormalization) but not transformers' SDPA graph (measured in
    docs/latency.md). The two compute the same function; the model is restored afterwards."""
    previous = getattr(model.config, "_attn_implementation", None)
    switch = model.config.model_type == "bert" and previous not in (None, "eager")
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(previous)


def export_onnx(model: PreTrainedModel, path: str | Path, opset: int = 17, *, fusable: bool = True) -> Path:
    """Write ``model`` as ONNX with dynamic batch and sequence axes (inputs: ids, mask, token types).

    ``fusable``: trace stock BERT through its eager attention so that ONNX Runtime's transformer
    optimiser can fuse it (`_eager_attention`); False keeps the model's own attention (SDPA).
    """
    try:
        import onnx  # noqa: F401  (the exporter needs it; fail early with the fix)
    except ImportError:
        raise UserError("ONNX export needs the onnx extra: pip install 'autotinybert[onnx]'") from None
    path = Path(path)
    example = random_inputs(model.config.vocab_size, batch=2, seq_len=16, seed=0)
    wrapper = _LogitsOnly(model).eval()
    outputs = onnx_output_names(model)
    # The tracer warns about Python-side shape checks in transformers' masking code; the
    # exported graph is verified numerically instead (verify_export), on other shapes too.
    with torch.no_grad(), warnings.catch_warnings(), (_eager_attention(model) if fusable else contextlib.nullcontext()):
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*aten::index.*", category=UserWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)  # legacy exporter: see the dynamo note
        torch.onnx.export(
            wrapper,
            (example["input_ids"], example["attention_mask"], example["token_type_ids"]),
            str(path),
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=outputs,
            dynamic_axes={name: {0: "batch"} if name == "logits" else {0: "batch", 1: "sequence"}
                          for name in ("input_ids", "attention_mask", "token_type_ids", *outputs)},
            opset_version=opset,
            # The TorchScript exporter is deprecated but still shipped; it handles transformers'
            # masking code with dynamic axes and is much faster than the dynamo exporter here.
            dynamo=False,
        )
    return path


def onnx_forms(model, directory: str | Path, forms: tuple[str, ...] = ONNX_FORMS, *,
               fusable: bool = True) -> dict[str, Path]:
    """Write the requested forms of ``model`` (fp32, optimized, int8 = optimised then quantised)
    into ``directory``; returns ``{form: path}`` (intermediate forms are written too)."""
    unknown = set(forms) - set(ONNX_FORMS)
    if unknown:
        raise UserError(f"unknown ONNX form(s) {sorted(unknown)}; choose from {', '.join(ONNX_FORMS)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"fp32": export_onnx(model, directory / FORM_FILES["fp32"], fusable=fusable)}
    if "optimized" in forms or "int8" in forms:
        paths["optimized"] = optimize_onnx(paths["fp32"], directory / FORM_FILES["optimized"], model.config)
    if "int8" in forms:
        paths["int8"] = quantize_onnx(paths["optimized"], directory / FORM_FILES["int8"])
    return paths


def onnx_session(path: str | Path, threads: int | None = None):
    """A CPU InferenceSession (`latency.runner.onnx_session`); an unreadable graph is a user error."""
    _needs_onnxruntime()
    from .latency.runner import onnx_session as session

    try:
        return session(Path(path), threads)
    except Exception as err:  # onnxruntime raises its own exception types for unreadable graphs
        raise UserError(f"ONNX Runtime cannot load {path}: {str(err).splitlines()[0]}") from None


class OnnxTaskModel:
    """An ONNX Runtime session behind the call signature of a transformers task model, so the task
    code (`tasks.finetune.evaluate_split`) scores an ONNX graph exactly like a torch model:
    ``model(input_ids=..., attention_mask=..., token_type_ids=...)`` returns ``.logits`` or
    ``.start_logits`` / ``.end_logits`` (torch tensors)."""

    training = False

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        self.path = Path(path)
        self.session = onnx_session(self.path, threads)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    @property
    def num_labels(self) -> int | None:
        """The classifier's static output width (None for question answering or a dynamic width)."""
        if self.outputs != ["logits"]:
            return None
        width = self.session.get_outputs()[0].shape[-1]
        return width if isinstance(width, int) else None

    def eval(self) -> "OnnxTaskModel":
        return self

    def train(self, mode: bool = True) -> "OnnxTaskModel":
        return self

    def __call__(self, **inputs):
        import numpy as np
        import torch

        ids = inputs["input_ids"]
        feeds = {}
        for name in self.inputs:
            value = inputs.get(name)
            if value is None:  # BERT's defaults: attend everywhere, one segment
                value = torch.ones_like(ids) if name == "attention_mask" else torch.zeros_like(ids)
            feeds[name] = value.cpu().numpy().astype(np.int64)
        values = [torch.from_numpy(v) for v in self.session.run(None, feeds)]
        return SimpleNamespace(**dict(zip(self.outputs, values)))
