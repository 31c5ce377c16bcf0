"""Time an architecture as deployed: build the encoder, run it in torch eager or ONNX Runtime, summarise."""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..errors import UserError
from ..space import Arch, parameter_count
from .costs import flops
from .hardware import fingerprint
from ..settings import LatencySettings


def build_model(arch: Arch, vocab_size: int = 30522, seq_len: int = 128):
    """The encoder a user would deploy for ``arch`` (random weights, eval mode).

    Stock ``transformers.BertModel`` whenever BERT represents the architecture, else the
    registered ``AutoTinyBertModel`` (what `autotinybert extract --encoder-only` writes).
    """
    import torch
    from transformers import BertConfig, BertModel

    from .. import hf

    fields = dict(vocab_size=vocab_size, hidden_size=arch.hidden_size, num_hidden_layers=arch.num_hidden_layers,
                  num_attention_heads=arch.num_attention_heads, intermediate_size=arch.intermediate_size,
                  max_position_embeddings=max(512, seq_len))
    # Initialisation draws from the global RNG; fork it so timing never perturbs a caller's seeds.
    with torch.random.fork_rng(devices=[]):
        if arch.is_bert_compatible:
            model = BertModel(BertConfig(**fields))
        else:
            model = hf.AutoTinyBertModel(hf.AutoTinyBertConfig(qkv_size=arch.qkv_size, **fields))
    return model.eval()


def _inputs(settings: LatencySettings) -> dict[str, Any]:
    import torch

    gen = torch.Generator().manual_seed(0)
    shape = (settings.batch_size, settings.seq_len)
    return {
        "input_ids": torch.randint(1, settings.vocab_size, shape, generator=gen),
        "attention_mask": torch.ones(shape, dtype=torch.long),  # full-length sequences, as in the paper
        "token_type_ids": torch.zeros(shape, dtype=torch.long),
    }


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run with ``threads`` intra-op threads, then restore the caller's setting."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --- timing -----------------------------------------------------------------------------------
def summarize(times_ms: Sequence[float]) -> dict[str, float]:
    """Median and p90 are the numbers we use; min/max/quartiles make outliers visible."""
    t = np.asarray(times_ms, dtype=np.float64)
    q1, median, q3, p90 = np.percentile(t, [25, 50, 75, 90])
    return {"median_ms": float(median), "p90_ms": float(p90), "mean_ms": float(t.mean()), "min_ms": float(t.min()),
            "max_ms": float(t.max()), "q1_ms": float(q1), "q3_ms": float(q3), "iqr_ms": float(q3 - q1),
            "repeats": int(t.size)}


def _time_calls(run: Callable[[], Any], settings: LatencySettings, timer: Callable[[], float]) -> list[float]:
    for _ in range(settings.warmup):
        run()
    times = []
    for _ in range(settings.repeats):
        start = timer()
        run()
        times.append((timer() - start) * 1000.0)
    return times


def _torch_times(model, settings: LatencySettings, timer: Callable[[], float],
                 probe: Callable[[], None] | None) -> list[float]:
    import torch

    inputs = _inputs(settings)
    with torch_threads(settings.threads), torch.inference_mode():
        if probe is not None:
            probe()
        return _time_calls(lambda: model(**inputs), settings, timer)


def _onnx_times(model, settings: LatencySettings, timer: Callable[[], float]) -> list[float]:
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("the onnxruntime engine needs the onnx extra: pip install 'autotinybert[onnx]'") from None
    from ..export import export_onnx

    feeds = {name: tensor.numpy() for name, tensor in _inputs(settings).items()}
    with tempfile.TemporaryDirectory(prefix="autotinybert-latency-") as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer chatter about constant shapes; the graph is checked elsewhere
            path = export_onnx(model, Path(tmp) / "model.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = settings.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return _time_calls(lambda: session.run(None, feeds), settings, timer)


def measure(arch: Arch | str, settings: LatencySettings = LatencySettings(), *,
            timer: Callable[[], float] | None = None, probe: Callable[[], None] | None = None) -> dict[str, Any]:
    """Time ``arch`` as deployed; returns latency statistics, parameters, FLOPs and the fingerprint.

    ``timer`` defaults to ``settings.timer()``; ``probe`` (torch engine) runs inside the timed
    context; tests use both to check timing and thread settings.
    """
    arch = Arch.parse(arch) if isinstance(arch, str) else arch
    timer = timer or settings.timer()
    model = build_model(arch, settings.vocab_size, settings.seq_len)
    if settings.engine == "torch":
        times = _torch_times(model, settings, timer, probe)
    else:
        times = _onnx_times(model, settings, timer)
    return {
        "arch": str(arch),
        "latency": summarize(times),
        "parameters": parameter_count(arch, settings.vocab_size, max(512, settings.seq_len), pooler=True),
        "flops": flops(arch, settings.batch_size, settings.seq_len),
        "fingerprint": fingerprint(settings),
    }
