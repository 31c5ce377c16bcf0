"""Time an architecture as deployed: build the encoder, run it in torch eager or ONNX Runtime, summarise."""

from __future__ import annotations

import contextlib
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence


from ..errors import UserError
from ..space import Arch, parameter_count
from ..settings import LatencySettings
from .costs import flops
from .hardware import fingerprint
from .runner import onnx_feeds, onnx_session, paced_summary, summarize, time_interleaved


# Timed in every chunk of a profile: mid-sized and BERT-shaped, so every engine and form runs it the
# way it runs the rest; its median per chunk tracks how fast the machine is at that moment.
DRIFT_ANCHOR = Arch(4, 256, 1024, 4, 256)


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
def _torch_run(arch: Arch, settings: LatencySettings) -> Callable[[], Any]:
    model = build_model(arch, settings.vocab_size, settings.seq_len)
    if settings.quantize == "int8":
        from ..deploy import quantize_torch

        model = quantize_torch(model)
    inputs = _inputs(settings)
    return lambda: model(**inputs)


def _onnx_run(arch: Arch, settings: LatencySettings, directory: Path) -> Callable[[], Any]:
    """The shipped ONNX form of ``arch``: exported, optimised and/or quantised, in a session."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise UserError("the onnxruntime engine needs the onnx extra: pip install 'autotinybert[onnx]'") from None
    path = onnx_form_file(build_model(arch, settings.vocab_size, settings.seq_len), settings, directory)
    session = onnx_session(path, settings.threads)
    feeds = onnx_feeds(settings.batch_size, settings.seq_len, settings.vocab_size)
    return lambda: session.run(None, feeds)


def onnx_form_file(model, settings: LatencySettings, directory: Path) -> Path:
    """Write ``model`` in the ONNX form of ``settings`` (fp32 / optimised / int8) under ``directory``."""
    from ..deploy import onnx_forms, quantize_onnx

    form = "optimized" if settings.optimize else "fp32"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer chatter about constant shapes; the graph is checked elsewhere
        path = onnx_forms(model, directory, (form,))[form]
    if settings.quantize == "int8":  # int8 of the graph as it is (optimised or not)
        path = quantize_onnx(path, directory / (path.stem + ".int8.onnx"))
    return path


def measure_many(archs: Sequence[Arch | str], settings: LatencySettings = LatencySettings(), *,
                 timer: Callable[[], float] | None = None, probe: Callable[[], None] | None = None,
                 on_record: Callable[[dict[str, Any]], None] | None = None,
                 anchor: Arch | None = None) -> list[dict[str, Any]]:
    """Time ``archs`` as deployed, ``settings.interleave`` at a time in interleaved rounds (`time_interleaved`):
    repeats are added until each median is stable to ``settings.tolerance``, outliers re-measured,
    the noise (IQR / median) recorded, and a warning given when it stays above ``settings.noise_limit``.

    ``timer`` defaults to ``settings.timer()``; ``probe`` runs inside the timed context (tests
    check thread settings with it); ``on_record`` receives each record as its chunk finishes.
    ``anchor``: also timed in every round of every chunk; each record carries the anchor's median
    in its chunk (``anchor``) and its own timings divided by the anchor's of the same round
    (``paced``, `runner.paced_summary`), which `fitting.drift_corrected_ms` turns into the latency
    at the machine's typical speed.
    """
    archs = [Arch.parse(a) if isinstance(a, str) else a for a in archs]
    timer = timer or settings.timer()
    fp = fingerprint(settings)
    records = []
    with tempfile.TemporaryDirectory(prefix="autotinybert-anchor-") as anchor_tmp:
        # Built (and for ONNX exported and quantised) once, then timed again in every chunk.
        anchor_run = _deployed_run(anchor, settings, Path(anchor_tmp)) if anchor is not None else None
        for begin in range(0, len(archs), settings.interleave):
            chunk = archs[begin:begin + settings.interleave]
            records += _measure_chunk(chunk, settings, timer, probe, on_record, anchor, anchor_run, begin, fp)
    return records


def _deployed_run(arch: Arch, settings: LatencySettings, directory: Path) -> Callable[[], Any]:
    return _torch_run(arch, settings) if settings.engine == "torch" else _onnx_run(arch, settings, directory)


def _measure_chunk(chunk: list[Arch], settings: LatencySettings, timer, probe, on_record, anchor: Arch | None,
                   anchor_run: Callable[[], Any] | None, begin: int, fp: dict[str, Any]) -> list[dict[str, Any]]:
    """One interleaved chunk of `measure_many` (with the anchor, when given, as one more run)."""
    import torch

    records, started = [], time.time()
    with tempfile.TemporaryDirectory(prefix="autotinybert-latency-") as tmp, torch_threads(settings.threads), \
            torch.inference_mode():
        runs = {i: _deployed_run(arch, settings, Path(tmp) / str(i)) for i, arch in enumerate(chunk)}
        if anchor_run is not None:
            runs[len(chunk)] = anchor_run
        if probe is not None:
            probe()
        timed = time_interleaved(runs, warmup=settings.warmup, repeats=settings.repeats,
                                 max_repeats=settings.max_repeats, tolerance=settings.tolerance,
                                 noise_limit=settings.noise_limit, timer=timer, seed=begin,
                                 pace=len(chunk) if anchor_run is not None else None)
    drift = _anchor_record(anchor, timed.pop(len(chunk)), started) if anchor is not None else None
    noisy = [str(chunk[i]) for i, result in timed.items() if result["noisy"]]
    if noisy:
        warnings.warn(f"{len(noisy)} latency measurement(s) stayed noisier than {settings.noise_limit:.0%} "
                      f"IQR / median after re-measuring ({', '.join(noisy)}): the machine is too busy to trust "
                      "them; use --clock cpu with --threads 1, or a quieter machine", stacklevel=3)
    for i, arch in enumerate(chunk):
        result = timed[i]
        record = {
            "arch": str(arch),
            "latency": summarize(result["times_ms"]),
            "rounds": result["rounds"], "remeasured": result["remeasured"], "noisy": result["noisy"],
            "parameters": parameter_count(arch, settings.vocab_size, max(512, settings.seq_len), pooler=True),
            "flops": flops(arch, settings.batch_size, settings.seq_len),
            "fingerprint": fp,
            **({"anchor": drift, "paced": paced_summary(result["times_ms"], result["pace_ms"])} if drift else {}),
        }
        records.append(record)
        if on_record is not None:
            on_record(record)
    return records


def _anchor_record(anchor: Arch, result: dict[str, Any], started: float) -> dict[str, Any]:
    """The anchor's timing in one chunk; ``chunk`` (when the chunk started) tells chunks apart."""
    latency = summarize(result["times_ms"])
    return {"arch": str(anchor), "median_ms": latency["median_ms"], "noise": latency["noise"], "chunk": started}


def measure(arch: Arch | str, settings: LatencySettings = LatencySettings(), *,
            timer: Callable[[], float] | None = None, probe: Callable[[], None] | None = None) -> dict[str, Any]:
    """Time one ``arch`` as deployed (`measure_many`); latency statistics, parameters, FLOPs, fingerprint."""
    return measure_many([arch], settings, timer=timer, probe=probe)[0]
