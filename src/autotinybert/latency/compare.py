"""Time shipped models against a reference, as a user would: ``autotinybert latency compare``.

The measurement a user reproduces (issue 20). A latency target ("3× faster than the source") is
only met when the model *as it ships* is that much faster on the user's machine, timed the way
the user will time it: load the exported files (a Hugging Face checkpoint folder in torch eager,
or an ``.onnx`` file in ONNX Runtime), feed fixed inputs (batch 1, sequence 128 by default, one
thread), warm up, then time a plain loop. The loop is `runner.time_interleaved` with one call per
model per round, in a shuffled order, for a fixed number of rounds, with the reference timed in
every round (``pace``). A model's speed-up is the median over rounds of *reference / model in
the same round* (`runner.paced_summary`): a shared machine that slows down for a few seconds
slows both timings of a round alike, so the ratio keeps what the milliseconds lose.

No predictor, no random-weight rebuild of an architecture, no re-measuring of outliers: what is
timed is the files, and every round counts.
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import SetupWarning, UserError, first_line
from ..settings import LatencySettings
from .runner import load_average, machine_fingerprint, onnx_feeds, paced_summary, summarize, time_interleaved

RESULTS_FORMAT = "autotinybert-latency-compare"
RESULTS_VERSION = 1
ONNX_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Graph operators that tell the shipped ONNX form (names as in `LatencySettings.form`).
_OPTIMIZED_OPS = {"Attention", "MultiHeadAttention", "EmbedLayerNormalization", "SkipLayerNormalization", "QAttention",
                  "QEmbedLayerNormalization"}
_INT8_OPS = {"DynamicQuantizeMatMul", "MatMulInteger", "DynamicQuantizeLinear", "QAttention"}


@dataclass
class Shipped:
    """One model as given on the command line, checked but not loaded yet."""

    name: str                   # as the user wrote it (a path or builtin:...)
    path: Path
    flag: str                   # --model or --reference: what error messages name
    kind: str                   # "checkpoint" (a Hugging Face folder) or "onnx"
    form: str                   # torch, onnxruntime, onnxruntime-opt, onnxruntime-int8, onnxruntime-opt-int8
    vocab_size: int | None      # None where the file does not say
    config: dict[str, Any] | None = None


def locate(spec: str, flag: str, trust_remote_code: bool = False) -> Shipped:
    """What ``spec`` names, checked before anything loads: a checkpoint folder (config.json, weights,
    no custom code unless trusted), an ``.onnx`` file (with ONNX Runtime installed), or
    ``builtin:all-minilm-l6-v2``. Anything else is a `UserError` naming ``flag``."""
    from ..builtin_data import MINILM, is_builtin, resolve_model
    from ..checkpoint import check_checkpoint

    if is_builtin(spec) and spec != MINILM:
        raise UserError(f"{flag} {spec}: unknown built-in model; the packaged one is {MINILM}")
    if spec.startswith("hf:"):
        raise UserError(f"{flag} {spec}: hub names are not timed here; download the model and give its folder")
    path = Path(resolve_model(spec))
    if not path.exists():
        raise UserError(f"{flag} {spec}: no such file or folder")
    if path.is_dir():
        config = check_checkpoint(path, flag, trust_remote_code)
        vocab = config.get("vocab_size")
        return Shipped(spec, path, flag, "checkpoint", "torch", vocab if isinstance(vocab, int) else None, config)
    if path.suffix.lower() != ".onnx":
        raise UserError(f"{flag} {spec}: not a model; give a Hugging Face checkpoint folder (config.json + weights) "
                        "or an .onnx file")
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise UserError(f"{flag} {spec}: an .onnx model runs in ONNX Runtime, which is not installed: "
                        "pip install 'autotinybert[onnx]'") from None
    form, vocab = _onnx_form_and_vocab(path)
    return Shipped(spec, path, flag, "onnx", form, vocab)


def _onnx_form_and_vocab(path: Path) -> tuple[str, int | None]:
    """The form the graph's operators show, and the rows of the table ``input_ids`` index
    (best effort: without the onnx package, or on a graph it cannot read, ONNX Runtime decides)."""
    try:
        import onnx

        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:  # not installed, or not a graph: the session reports an unreadable file
        return "onnxruntime", None
    ops = {node.op_type for node in graph.node}
    form = "-".join(["onnxruntime"] + (["opt"] if ops & _OPTIMIZED_OPS else []) + (["int8"] if ops & _INT8_OPS else []))
    rows = {init.name: int(init.dims[0]) for init in graph.initializer if init.dims}
    producer = {out: node for node in graph.node for out in node.output}
    ids = {"input_ids"}  # and its casts (the fused embedding takes int32 ids)
    for node in graph.node:
        if node.op_type == "Cast" and node.input and node.input[0] in ids:
            ids.update(node.output)
    for node in graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] in ids:
            table = node.input[0]
        elif node.op_type in ("EmbedLayerNormalization", "QEmbedLayerNormalization") and len(node.input) > 2 \
                and node.input[0] in ids:
            table = node.input[2]
        else:
            continue
        for _ in range(4):  # an int8 table is dequantised on the way: follow the chain to the initializer
            if table in rows:
                return form, rows[table]
            if table not in producer or not producer[table].input:
                break
            table = producer[table].input[0]
    return form, None


def _auto_class(config: dict[str, Any]):
    """The head the checkpoint ships with when it is a task model, else the bare encoder."""
    from transformers import AutoModel, AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    names = config.get("architectures") or []
    name = names[0] if names and isinstance(names[0], str) else ""
    if name.endswith("ForSequenceClassification"):
        return AutoModelForSequenceClassification
    if name.endswith("ForQuestionAnswering"):
        return AutoModelForQuestionAnswering
    return AutoModel  # an encoder, or a pre-training checkpoint served as one (its MLM head is not shipped)


def _load(model: Shipped, settings: LatencySettings, feeds: dict[str, Any],
          trust_remote_code: bool) -> tuple[Callable[[], Any], str]:
    """``(run, class name)``: one forward pass of ``model`` on the fixed inputs (``feeds``: numpy arrays)."""
    if model.kind == "onnx":
        from ..deploy import onnx_session

        session = onnx_session(model.path, settings.threads)
        names = [i.name for i in session.get_inputs()]
        unknown = [n for n in names if n not in ONNX_INPUTS]
        if unknown:
            raise UserError(f"{model.flag} {model.name} wants inputs {', '.join(unknown)}; only "
                            f"{', '.join(ONNX_INPUTS)} are fed (a BERT-family encoder graph)")
        fed = {name: feeds[name] for name in names}
        return (lambda: session.run(None, fed)), "InferenceSession"
    import torch

    from ..checkpoint import load_pretrained

    positions = model.config.get("max_position_embeddings")
    if isinstance(positions, int) and positions < settings.seq_len:
        raise UserError(f"{model.flag} {model.name} takes at most {positions} tokens; choose --seq-len {positions} "
                        "or less")
    net = load_pretrained(_auto_class(model.config), model.path, model.flag, trust_remote_code).eval()
    accepted = inspect.signature(net.forward).parameters
    inputs = {k: torch.from_numpy(v) for k, v in feeds.items() if k in accepted}
    return (lambda: net(**inputs)), type(net).__name__


def _inputs(settings: LatencySettings, models: Sequence[Shipped]):
    """``(feeds, vocabulary)``: the fixed inputs (`runner.onnx_feeds`: full-length ids, seed 0, from the
    smallest vocabulary among the models, since a lookup costs the same whichever row it reads; an
    all-ones mask; one segment)."""
    vocab = min([m.vocab_size for m in models if m.vocab_size] + [settings.vocab_size])
    return onnx_feeds(settings.batch_size, settings.seq_len, vocab), vocab


def compare_models(models: Sequence[str], reference: str, settings: LatencySettings = LatencySettings(), *,
                   rounds: int = 15, trust_remote_code: bool = False, timer: Callable[[], float] | None = None,
                   seed: int = 0) -> dict[str, Any]:
    """Time ``models`` and ``reference`` (paths or builtin names) in ``rounds`` interleaved rounds.

    ``settings``: batch, sequence, threads, warm-up, clock and noise limit (the form is each file's
    own). Every round times each model once, in a shuffled order (seeded); the reference is timed in
    every round. Returns ``{"models": [row, ...]}`` (the reference first) with each row's median
    ms, its speed-up (median of per-round reference / model) and its noise (IQR / median), plus
    the raw timings, the shape and the machine. Bad input raises `UserError` before any timing.
    """
    import torch

    from .timing import torch_threads

    shipped = [locate(reference, "--reference", trust_remote_code),
               *(locate(m, "--model", trust_remote_code) for m in models)]
    feeds, vocab = _inputs(settings, shipped)
    load_before = load_average()
    with torch_threads(settings.threads), torch.inference_mode():
        loaded = [_load(m, settings, feeds, trust_remote_code) for m in shipped]
        for model, (run, _) in zip(shipped, loaded):
            _try(model, run, settings)
        timed = time_interleaved({i: run for i, (run, _) in enumerate(loaded)}, warmup=settings.warmup,
                                 repeats=rounds, max_repeats=rounds, tolerance=0.0, noise_limit=math.inf,
                                 timer=timer or settings.timer(), seed=seed, pace=0)
    rows = []
    for i, (model, (_, class_name)) in enumerate(zip(shipped, loaded)):
        result = timed[i]
        latency = summarize(result["times_ms"])
        speedup = paced_summary(result["pace_ms"], result["times_ms"])  # reference / model, round by round
        rows.append({"model": model.name, "path": str(model.path), "reference": i == 0, "form": model.form,
                     "class": class_name, "median_ms": latency["median_ms"], "speedup": speedup["ratio"],
                     "noise": latency["noise"], "speedup_noise": speedup["noise"], "latency": latency,
                     "rounds": result["rounds"], "times_ms": result["times_ms"], "reference_ms": result["pace_ms"]})
    noisy = [row["model"] for row in rows if row["noise"] > settings.noise_limit]
    if noisy:
        warnings.warn(f"{len(noisy)} of {len(rows)} timings are noisier than {settings.noise_limit:.0%} IQR / median "
                      f"({', '.join(noisy)}): the machine is busy; the speed-ups (divided round by round) hold up "
                      "better than the milliseconds; --clock cpu with --threads 1 ignores other processes' time",
                      SetupWarning, stacklevel=2)
    shape = {"batch_size": settings.batch_size, "seq_len": settings.seq_len, "threads": settings.threads,
             "clock": settings.clock, "warmup": settings.warmup, "rounds": rounds, "input_vocab": vocab}
    machine = machine_fingerprint({"engine": "per model"})
    for key in ("engine", "engine_version"):
        machine.pop(key)
    return {"format": RESULTS_FORMAT, "version": RESULTS_VERSION, "reference": reference, "shape": shape,
            "models": rows, "machine": machine,
            "load_average": {"before": load_before, "after": load_average()}}


def _try(model: Shipped, run: Callable[[], Any], settings: LatencySettings) -> None:
    """One call before timing: a model that cannot run on these inputs is the user's to fix."""
    try:
        run()
    except UserError:
        raise
    except Exception as err:  # torch and onnxruntime raise their own types on a shape / index mismatch
        raise UserError(f"{model.flag} {model.name} cannot run on batch {settings.batch_size} x sequence "
                        f"{settings.seq_len} inputs: {first_line(err)}") from None


def compare_table(result: dict[str, Any]) -> str:
    """The table the command prints: model, form, median ms, speed-up over the reference, noise."""
    rows = result["models"]
    width = max(len("model"), *(len(r["model"]) for r in rows))
    lines = [f"{'model':<{width}}  {'form':<22} {'median ms':>10} {'speed-up':>9} {'noise':>6}"]
    for row in rows:
        form = row["form"] + (" (reference)" if row["reference"] else "")
        lines.append(f"{row['model']:<{width}}  {form:<22} {row['median_ms']:>10.3f} {row['speedup']:>8.2f}x "
                     f"{100 * row['noise']:>5.1f}%")
    s = result["shape"]
    lines.append(f"batch {s['batch_size']}, sequence {s['seq_len']}, {s['threads']} thread(s), {s['clock']} clock; "
                 f"{s['warmup']} warm-up call(s), then {s['rounds']} rounds, each timing every model once in a "
                 "shuffled order; speed-up = median over rounds of reference / model in the same round; noise = IQR / median")
    return "\n".join(lines)

