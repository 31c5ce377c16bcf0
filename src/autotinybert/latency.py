"""Latency of architectures as deployed, a hardware fingerprint, and the latency predictor.

Paper §4.1 / official code: latency is measured on a CPU with one thread, batch 1 and sequence
length 128; the speedup target becomes milliseconds via ``latency(BERT-base) / speedup``; an MLP
on the normalised hyper-parameters (d_m, L, d_f, d_qkv) predicts latency so that the search can
score millions of candidates without timing them.

Differences from the official code, on purpose:

* We time the model a user would deploy (stock ``BertModel`` or the registered
  ``AutoTinyBertModel``, random weights) on a named engine (torch eager or ONNX Runtime), not a
  sliced supernet.
* Every measurement carries a fingerprint (CPU, versions, shapes); a predictor used on another
  fingerprint warns, because latency does not transfer between machines.
* The predictor is plain JSON (weights as lists) evaluated with numpy; never pickle.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import random
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from .errors import UserError
from .files import atomic_write_json, atomic_write_text
from .space import BERT_BASE, FEATURE_NAMES, Arch, SearchSpace, parameter_count

ENGINES = ("torch", "onnxruntime")
PREDICTOR_FORMAT = "autotinybert-latency-predictor"
PREDICTOR_VERSION = 1
# Fingerprint keys that must agree for a latency number to transfer (shapes and engine change the
# workload; CPU model and core count change the hardware; library versions change the kernels).
_FINGERPRINT_KEYS = ("cpu_model", "logical_cpus", "engine", "engine_version", "batch_size", "seq_len", "threads", "clock")
CLOCKS = ("wall", "cpu")


# --- settings ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LatencySettings:
    """How to time one architecture. Defaults are the paper's: CPU, 1 thread, batch 1, seq 128."""

    engine: str = "torch"
    batch_size: int = 1
    seq_len: int = 128
    threads: int = 1
    warmup: int = 3
    repeats: int = 20
    vocab_size: int = 30522
    clock: str = "wall"

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise UserError(f"unknown latency engine {self.engine!r}: use one of {', '.join(ENGINES)}")
        if self.clock not in CLOCKS:
            raise UserError(f"unknown --clock {self.clock!r}: use one of {', '.join(CLOCKS)}")
        if self.clock == "cpu" and self.threads != 1:
            raise UserError("--clock cpu sums CPU time over threads, which is latency only with --threads 1; "
                            "use --clock wall for multi-threaded measurements")
        for name in ("batch_size", "seq_len", "threads", "repeats", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be an integer >= 1; got {value!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise UserError(f"--warmup must be an integer >= 0; got {self.warmup!r}")

    def shape(self) -> dict[str, Any]:
        return {"engine": self.engine, "batch_size": self.batch_size, "seq_len": self.seq_len, "threads": self.threads,
                "clock": self.clock}

    def timer(self) -> Callable[[], float]:
        """Wall clock (what a user waits) or this process's CPU time.

        With one thread the forward pass runs entirely on the calling thread, so process CPU
        time equals wall time on an idle machine, but does not count time the scheduler gives
        to other processes: on a shared machine it removes time-slicing noise (not cache or
        memory-bandwidth contention).
        """
        return time.perf_counter if self.clock == "wall" else time.process_time


# --- fingerprint ------------------------------------------------------------------------------
def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def _physical_cores() -> int | None:
    """Distinct (physical id, core id) pairs from /proc/cpuinfo; None where unavailable."""
    with contextlib.suppress(OSError):
        cores, physical = set(), "0"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "physical id":
                physical = value.strip()
            elif key.strip() == "core id":
                cores.add((physical, value.strip()))
        return len(cores) or None
    return None


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def fingerprint(settings: LatencySettings) -> dict[str, Any]:
    """Hardware + software + shapes of a measurement; stored with every record and predictor."""
    versions = {name: _version(name) for name in ("torch", "onnxruntime", "transformers", "numpy")}
    return {
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": _physical_cores(),
        "machine": platform.machine(),
        "system": platform.system(),
        "python": platform.python_version(),
        "versions": versions,
        "engine_version": versions["torch" if settings.engine == "torch" else "onnxruntime"],
        **settings.shape(),
    }


def fingerprint_differences(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """Human-readable ``key: expected -> actual`` for the keys that make latencies incomparable."""
    return [f"{key}: {expected.get(key)!r} -> {actual.get(key)!r}"
            for key in _FINGERPRINT_KEYS if expected.get(key) != actual.get(key)]


# --- cost model -------------------------------------------------------------------------------
def flops(arch: Arch, batch_size: int = 1, seq_len: int = 128, pooler: bool = True) -> int:
    """Floating-point operations (2 x multiply-accumulates) of all matmuls of one encoder forward.

    Per layer and token: Q, K, V projections ``3·d_m·d_qkv``, output projection ``d_qkv·d_m``,
    FFN ``2·d_m·d_f``; per layer and sequence: attention scores and context ``2·T²·d_qkv``
    (summed over heads). The pooler adds one ``d_m × d_m`` matmul per sequence. Embedding
    lookups, LayerNorm, softmax and GELU are not matmuls and are not counted.
    """
    d, f, q, T = arch.hidden_size, arch.intermediate_size, arch.qkv_size, seq_len
    per_layer = T * (3 * d * q + q * d + 2 * d * f) + 2 * T * T * q
    macs = arch.num_hidden_layers * per_layer + (d * d if pooler else 0)
    return 2 * batch_size * macs


DERIVED_INPUTS = ("log_flops", "log_attention_flops_per_layer", "log_ffn_flops_per_layer")
INPUT_NAMES = (*FEATURE_NAMES, *DERIVED_INPUTS)


def design_inputs(features: np.ndarray, seq_len: int) -> np.ndarray:
    """(N, 5) hyper-parameters -> (N, 8) predictor inputs: the raw features plus log matmul costs.

    The paper's MLP sees (d_m, L, d_f, d_qkv) only; adding the analytic log-costs of the whole
    model, of one attention block and of one FFN lets a small MLP learn the per-shape efficiency
    (what a CPU actually varies in) instead of re-deriving products of features from ~300
    noisy points. On our torch profile this cut held-out MAPE from ~5-6% to ~4% (docs/latency.md).
    """
    L, d, f, _, q = (features[:, i] for i in range(5))
    T = float(seq_len)
    attention = T * 4 * d * q + 2 * T * T * q  # projections + scores + context, one layer
    return np.column_stack([features, np.log(flops_array(features, 1, seq_len)), np.log(2 * attention),
                            np.log(2 * T * 2 * d * f)])


def flops_array(features: np.ndarray, batch_size: int = 1, seq_len: int = 128) -> np.ndarray:
    """`flops` for rows of `FEATURE_NAMES` (layers, hidden, ffn, heads, qkv); float64."""
    L, d, f, _, q = (features[:, i].astype(np.float64) for i in range(5))
    T = float(seq_len)
    per_layer = T * (3 * d * q + q * d + 2 * d * f) + 2 * T * T * q
    return 2.0 * batch_size * (L * per_layer + d * d)


# --- deployable model -------------------------------------------------------------------------
def build_model(arch: Arch, vocab_size: int = 30522, seq_len: int = 128):
    """The encoder a user would deploy for ``arch`` (random weights, eval mode).

    Stock ``transformers.BertModel`` whenever BERT represents the architecture, else the
    registered ``AutoTinyBertModel`` (what `autotinybert extract --encoder-only` writes).
    """
    import torch
    from transformers import BertConfig, BertModel

    from . import hf

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
    from .export import export_onnx

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


# --- profiling --------------------------------------------------------------------------------
def plan_architectures(space: SearchSpace, samples: int, seed: int = 0, hidden_bins: int = 4) -> list[Arch]:
    """``samples`` distinct architectures spread over ``space``, deterministic in ``seed``.

    Stratified over (layers × hidden-size bins) so that small and large models are both covered:
    strata are visited round-robin (in a shuffled order each round); inside a stratum the other
    hyper-parameters are uniform on the grid.
    """
    if samples < 1:
        raise UserError(f"--samples must be >= 1; got {samples}")
    rng = random.Random(seed)
    hidden = list(space.hidden.values())
    bins = [chunk for chunk in np.array_split(np.asarray(hidden), min(hidden_bins, len(hidden))) if len(chunk)]
    strata = [(layers, [int(h) for h in chunk]) for layers in space.layers.values() for chunk in bins]
    planned: list[Arch] = []
    seen: set[Arch] = set()
    attempts = 0
    order: list[int] = []
    while len(planned) < samples:
        attempts += 1
        if attempts > 50 * samples + 1000:  # bounded: a tiny space cannot yield more distinct points
            raise UserError(f"the space holds fewer than {samples} distinct architectures; lower --samples")
        if not order:
            order = list(range(len(strata)))
            rng.shuffle(order)
        layers, hidden_choices = strata[order.pop()]
        arch = dataclasses.replace(space.sample(rng), num_hidden_layers=layers, hidden_size=rng.choice(hidden_choices))
        if arch not in seen and space.contains(arch):
            seen.add(arch)
            planned.append(arch)
    return planned


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of a profile JSONL file; a torn last line (interrupted write) is dropped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"latency data {path} does not exist; run 'autotinybert latency profile' first") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read latency data {path}: {err}") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            Arch.parse(record["arch"])
            float(record["latency"]["median_ms"])
        except (ValueError, KeyError, TypeError):
            if number == len(lines):
                break  # interrupted while appending; --resume measures it again
            raise UserError(f"{path}:{number} is not a latency record; regenerate it with 'latency profile'") from None
        records.append(record)
    return records


def _append_line(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())  # a crash loses at most the line being written


def profile(space: SearchSpace | str, samples: int, out: str | Path, settings: LatencySettings = LatencySettings(),
            *, seed: int = 0, resume: bool = False, overwrite: bool = False, progress: bool = True,
            arguments: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Measure BERT-base (the speedup reference) and ``samples`` planned architectures into ``out``.

    One JSON line per measurement, appended and fsynced as it goes. With ``resume`` only
    architectures missing from ``out`` are measured; the plan depends only on (space, samples,
    seed), so a rerun continues the same list.
    """
    space = SearchSpace.load(space) if isinstance(space, (str, Path)) else space
    out = Path(out)
    plan = [(BERT_BASE, True)] + [(arch, False) for arch in plan_architectures(space, samples, seed)]
    done: dict[str, dict[str, Any]] = {}
    if out.exists() and out.stat().st_size:
        if not (resume or overwrite):
            raise UserError(f"{out} already exists; pass --resume to continue it or --overwrite to start again")
        if resume:
            done = _check_resumable(out, settings, space)
        else:
            out.unlink()
    out.parent.mkdir(parents=True, exist_ok=True)
    if arguments is not None:
        write_output_config(out, arguments)
    todo = [(arch, ref) for arch, ref in plan if str(arch) not in done]
    bar = _progress(len(todo), progress, f"latency ({settings.engine})")
    for arch, is_reference in todo:
        record = measure(arch, settings)
        record.update(reference=is_reference, features=arch.to_dict(), space=space.to_dict(), seed=seed)
        _append_line(out, record)
        done[str(arch)] = record
        bar.update(1)
        bar.set_postfix_str(f"{arch} {record['latency']['median_ms']:.1f} ms")
    bar.close()
    return [done[str(arch)] for arch, _ in plan]


def _check_resumable(out: Path, settings: LatencySettings, space: SearchSpace) -> dict[str, dict[str, Any]]:
    records = read_records(out)
    # Rewrite without a torn last line, so the next append starts on a fresh line.
    atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in records))
    for record in records:
        old = {key: record["fingerprint"].get(key) for key in settings.shape()}
        if old != settings.shape():
            raise UserError(f"{out} was measured with {old}, not {settings.shape()}; use another --out or the same options")
        if not record.get("reference") and record.get("space") != space.to_dict():
            raise UserError(f"{out} profiles another search space; use another --out or the same --space")
    return {record["arch"]: record for record in records}


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="arch", disable=not enabled, dynamic_ncols=True)


def write_output_config(out: str | Path, arguments: dict[str, Any]) -> Path:
    """``<out>.config.yaml`` next to a single-file output (several stages may share a directory)."""
    import yaml

    out = Path(out)
    clean = {k: (str(v) if isinstance(v, Path) else v) for k, v in arguments.items() if not callable(v)}
    path = out.with_name(out.name + ".config.yaml")
    atomic_write_text(path, yaml.safe_dump(clean, sort_keys=True))
    return path


# --- predictor ---------------------------------------------------------------------------------
def features_of(archs: Iterable[Arch]) -> np.ndarray:
    """(N, 5) float64 rows in `FEATURE_NAMES` order: layers, hidden, ffn, heads, qkv."""
    return np.array([[getattr(a, name) for name in FEATURE_NAMES] for a in archs], dtype=np.float64).reshape(-1, 5)


def metrics(predicted: np.ndarray, measured: np.ndarray) -> dict[str, float]:
    """RMSE (ms), MAPE (%) and Spearman rank correlation of predictions against measurements."""
    from scipy.stats import spearmanr

    predicted, measured = np.asarray(predicted, float), np.asarray(measured, float)
    rho = spearmanr(predicted, measured).statistic if len(measured) > 1 else float("nan")
    return {"rmse_ms": float(np.sqrt(np.mean((predicted - measured) ** 2))),
            "mape_pct": float(100 * np.mean(np.abs(predicted - measured) / measured)),
            "spearman": float(rho), "n": int(len(measured))}


@dataclasses.dataclass
class LatencyPredictor:
    """MLP predicting log-latency (paper §4.1, official ``latency_predictor``) from normalised
    (L, d_m, d_f, h, d_qkv) plus analytic log-costs (`design_inputs`), with the normalisation,
    fingerprint, space and BERT-base latency it was fitted with. Prediction is a numpy forward
    pass (no torch needed)."""

    weights: list[np.ndarray]
    biases: list[np.ndarray]
    feature_mean: np.ndarray
    feature_std: np.ndarray
    target_mean: float
    target_std: float
    fingerprint: dict[str, Any]
    space: dict[str, Any]
    seq_len: int = 128
    reference_ms: float | None = None
    baseline: dict[str, Any] | None = None
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)

    # --- prediction ------------------------------------------------------------------------
    def predict_features(self, features: np.ndarray, chunk: int = 16384) -> np.ndarray:
        """Latency in ms for (N, 5) feature rows; vectorised (scores millions of rows per second).

        float32 in cache-sized chunks: the search only ranks and windows candidates, and float32
        GEMMs are several times faster than float64 here.
        """
        x = design_inputs(np.asarray(features, dtype=np.float64).reshape(-1, 5), self.seq_len)  # (N, 8)
        x = ((x - self.feature_mean) / self.feature_std).astype(np.float32)
        out = np.empty(len(x), dtype=np.float64)
        for start in range(0, len(x), chunk):
            out[start:start + chunk] = self._forward(x[start:start + chunk])
        return np.exp(out * self.target_std + self.target_mean)

    def _forward(self, x: np.ndarray) -> np.ndarray:
        w0, b0 = self._weights32[0]
        # K=8 is too thin for BLAS to be efficient; broadcast FMAs are faster.  # (n, hidden)
        h = b0 + x[:, 0:1] * w0[0]
        for k in range(1, w0.shape[0]):
            h += x[:, k:k + 1] * w0[k]
        for w, b in self._weights32[1:]:
            np.maximum(h, 0.0, out=h)  # ReLU in place: no extra (n, hidden) array
            h = h @ w + b  # w: (in, out)
        return h[:, 0]

    @property
    def _weights32(self) -> list[tuple[np.ndarray, np.ndarray]]:
        cached = self.__dict__.get("_cache32")
        if cached is None or cached[0] is not self.weights:
            cached = (self.weights, [(w.astype(np.float32), b.astype(np.float32)) for w, b in zip(self.weights, self.biases)])
            self.__dict__["_cache32"] = cached
        return cached[1]

    def predict_many(self, archs: Iterable[Arch]) -> np.ndarray:
        return self.predict_features(features_of(archs))

    def predict(self, arch: Arch | str) -> float:
        arch = Arch.parse(arch) if isinstance(arch, str) else arch
        return float(self.predict_features(features_of([arch]))[0])

    def target_ms(self, speedup: float) -> float:
        """Latency budget for ``speedup`` × faster than BERT-base on the fingerprinted device."""
        if self.reference_ms is None:
            raise UserError("this predictor has no BERT-base reference latency; re-fit it from a 'latency profile' file")
        if speedup <= 0:
            raise UserError(f"a speedup must be positive; got {speedup}")
        return self.reference_ms / speedup

    # --- checks ------------------------------------------------------------------------------
    def check_fingerprint(self, current: dict[str, Any] | None = None) -> list[str]:
        """Warn when this machine/engine/shape differs from the one the predictor was fitted on."""
        if current is None:
            fp = self.fingerprint
            current = fingerprint(_settings_of(fp))
        differences = fingerprint_differences(self.fingerprint, current)
        if differences:
            warnings.warn("latency predictor was measured on a different device or setup ("
                          + "; ".join(differences) + "); its predictions may not hold here, "
                          "re-run 'autotinybert latency profile' and 'fit' on this machine", stacklevel=2)
        return differences

    def covers(self, arch: Arch) -> bool:
        """Whether ``arch`` lies in the space the predictor was profiled on (else it extrapolates)."""
        return SearchSpace.from_dict(self.space).contains(arch)

    def check_space(self, space: SearchSpace) -> None:
        if space.to_dict() != self.space:
            raise UserError(f"latency predictor was fitted on space {self.space}, not {space.to_dict()}; "
                            "profile and fit a predictor for this space")

    # --- files -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PREDICTOR_FORMAT, "version": PREDICTOR_VERSION, "feature_names": list(FEATURE_NAMES),
            "inputs": list(INPUT_NAMES), "seq_len": self.seq_len,
            "target": "log(latency_ms) standardised", "activation": "relu",
            "feature_mean": self.feature_mean.tolist(), "feature_std": self.feature_std.tolist(),
            "target_mean": self.target_mean, "target_std": self.target_std,
            "layers": [{"weight": w.tolist(), "bias": b.tolist()} for w, b in zip(self.weights, self.biases)],
            "fingerprint": self.fingerprint, "space": self.space, "reference_ms": self.reference_ms,
            "baseline": self.baseline, "metrics": self.metrics,
        }

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path, *, space: SearchSpace | None = None, check_fingerprint: bool = True) -> LatencyPredictor:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"latency predictor {path} does not exist; create it with 'autotinybert latency fit'") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"latency predictor {path} is corrupt ({str(err).splitlines()[0]}); "
                            "re-create it with 'autotinybert latency fit'") from None
        predictor = cls.from_dict(data, source=str(path))
        if space is not None:
            predictor.check_space(space)
        if check_fingerprint:
            predictor.check_fingerprint()
        return predictor

    @classmethod
    def from_dict(cls, data: Any, source: str = "predictor") -> LatencyPredictor:
        fix = "re-create it with 'autotinybert latency fit'"
        if not isinstance(data, dict) or data.get("format") != PREDICTOR_FORMAT:
            raise UserError(f"{source} is not an autotinybert latency predictor; {fix}")
        if data.get("version") != PREDICTOR_VERSION or data.get("inputs") != list(INPUT_NAMES):
            raise UserError(f"{source} has predictor version {data.get('version')} / inputs "
                            f"{data.get('inputs')}, not {PREDICTOR_VERSION} / {list(INPUT_NAMES)}; {fix}")
        try:
            weights = [np.asarray(layer["weight"], dtype=np.float64) for layer in data["layers"]]
            biases = [np.asarray(layer["bias"], dtype=np.float64) for layer in data["layers"]]
            predictor = cls(weights=weights, biases=biases,
                            feature_mean=np.asarray(data["feature_mean"], dtype=np.float64),
                            feature_std=np.asarray(data["feature_std"], dtype=np.float64),
                            target_mean=float(data["target_mean"]), target_std=float(data["target_std"]),
                            fingerprint=dict(data["fingerprint"]), space=dict(data["space"]), seq_len=int(data["seq_len"]),
                            reference_ms=None if data.get("reference_ms") is None else float(data["reference_ms"]),
                            baseline=data.get("baseline"), metrics=dict(data.get("metrics") or {}))
            SearchSpace.from_dict(predictor.space)
            _check_shapes(predictor)
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{source} is a corrupt latency predictor ({type(err).__name__}: {err}); {fix}") from None
        return predictor


def _check_shapes(p: LatencyPredictor) -> None:
    width = len(INPUT_NAMES)
    if p.feature_mean.shape != (width,) or p.feature_std.shape != (width,) or not np.all(p.feature_std > 0):
        raise ValueError(f"normalisation must be {width} means and {width} positive standard deviations")
    if p.seq_len < 1:
        raise ValueError("seq_len must be positive")
    for w, b in zip(p.weights, p.biases):
        if w.ndim != 2 or w.shape[0] != width or b.shape != (w.shape[1],):
            raise ValueError(f"layer shapes {w.shape} / {b.shape} do not chain from width {width}")
        width = w.shape[1]
    if not p.weights or width != 1:
        raise ValueError("the last layer must have one output")
    if not all(np.isfinite(w).all() for w in p.weights + p.biases):
        raise ValueError("weights must be finite")


# --- fitting -----------------------------------------------------------------------------------
def fit_baseline(features: np.ndarray, latency_ms: np.ndarray, seq_len: int = 128) -> dict[str, Any]:
    """Least-squares ``latency ≈ a·GFLOPs + b·layers + c``: the analytic baseline."""
    design = _baseline_design(features, seq_len)
    coef, *_ = np.linalg.lstsq(design, latency_ms, rcond=None)
    return {"formula": "a*GFLOPs + b*layers + c", "seq_len": seq_len, "coefficients": coef.tolist()}


def _baseline_design(features: np.ndarray, seq_len: int) -> np.ndarray:
    gflops = flops_array(features, 1, seq_len) / 1e9
    return np.stack([gflops, features[:, 0], np.ones(len(features))], axis=1)


def predict_baseline(baseline: dict[str, Any], features: np.ndarray) -> np.ndarray:
    return _baseline_design(features, baseline["seq_len"]) @ np.asarray(baseline["coefficients"])


def fit_mlp(features: np.ndarray, latency_ms: np.ndarray, *, hidden: int = 64, epochs: int = 3000, lr: float = 1e-2,
            weight_decay: float = 1e-3, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray], dict[str, Any]]:
    """Full-batch Adam on standardised features -> standardised log-latency.

    Log-latency makes the squared error relative (what MAPE measures) and turns the
    multiplicative layers × per-layer-cost structure into a sum. Weight decay 1e-3 matters:
    with ~300 noisy timings, weaker decay fits the noise (held-out MAPE 6% vs 4%). Deterministic: an explicit
    ``torch.Generator`` initialises the weights; global RNG state is untouched.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    mean, std = features.mean(0), features.std(0)
    std = np.where(std > 0, std, 1.0)  # a constant feature (KD heads) must not divide by zero
    target = np.log(latency_ms)
    t_mean, t_std = float(target.mean()), float(target.std() or 1.0)
    x = torch.tensor((features - mean) / std, dtype=torch.float64)
    y = torch.tensor((target - t_mean) / t_std, dtype=torch.float64)[:, None]
    sizes = [features.shape[1], hidden, hidden, 1]
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        bound = 1 / math.sqrt(fan_in)  # nn.Linear's default init, drawn from our generator
        params.append((torch.rand(fan_in, fan_out, generator=gen, dtype=torch.float64) * 2 - 1) * bound)
        params.append((torch.rand(fan_out, generator=gen, dtype=torch.float64) * 2 - 1) * bound)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    with torch_threads(1):  # tiny matrices: one thread is as fast and keeps results thread-count independent
        loss = _train(params, x, y, optimizer, schedule, epochs)
    weights = [p.detach().numpy().copy() for p in params[0::2]]
    biases = [p.detach().numpy().copy() for p in params[1::2]]
    norm = {"feature_mean": mean, "feature_std": std, "target_mean": t_mean, "target_std": t_std,
            "train_loss": float(loss)}
    return weights, biases, norm


def _train(params, x, y, optimizer, schedule, epochs: int) -> float:
    import torch

    loss = torch.zeros(())
    for _ in range(epochs):
        h = x
        for i in range(0, len(params), 2):
            h = h @ params[i] + params[i + 1]
            if i < len(params) - 2:
                h = torch.relu(h)
        loss = torch.mean((h - y) ** 2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return float(loss.detach())


def split_indices(n: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    import torch

    if not 0 < holdout < 1:
        raise UserError(f"--holdout must be between 0 and 1; got {holdout}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    n_test = max(1, int(round(n * holdout)))
    if n - n_test < 5:
        raise UserError(f"only {n} measured architectures; profile at least {n_test + 5} (--samples) before fitting")
    return order[n_test:], order[:n_test]


def fit(data: str | Path | Sequence[dict[str, Any]], *, holdout: float = 0.2, seed: int = 0, hidden: int = 64,
        epochs: int = 3000) -> tuple[LatencyPredictor, dict[str, Any]]:
    """Fit the MLP and the baseline on the non-reference records; metrics on a held-out split.

    The saved predictor is the one trained on the training split, so its reported held-out
    numbers describe exactly the file that is written.
    """
    records = read_records(data) if isinstance(data, (str, Path)) else list(data)
    samples = [r for r in records if not r.get("reference")]
    references = [r for r in records if r.get("reference")]
    if not samples:
        raise UserError("no architectures in the latency data; run 'autotinybert latency profile' first")
    _check_consistent(samples)
    features = features_of(Arch.parse(r["arch"]) for r in samples)
    latency = np.array([r["latency"]["median_ms"] for r in samples], dtype=np.float64)
    train, test = split_indices(len(samples), holdout, seed)
    seq_len = int(samples[0]["fingerprint"].get("seq_len", 128))
    inputs = design_inputs(features, seq_len)
    weights, biases, norm = fit_mlp(inputs[train], latency[train], hidden=hidden, epochs=epochs, seed=seed)
    baseline = fit_baseline(features[train], latency[train], seq_len)
    predictor = LatencyPredictor(
        weights=weights, biases=biases, feature_mean=norm["feature_mean"], feature_std=norm["feature_std"],
        target_mean=norm["target_mean"], target_std=norm["target_std"], fingerprint=samples[0]["fingerprint"],
        seq_len=seq_len,
        space=samples[0].get("space") or {}, reference_ms=references[0]["latency"]["median_ms"] if references else None,
        baseline=baseline)
    report = {
        "n_train": int(len(train)), "n_heldout": int(len(test)),
        "mlp": metrics(predictor.predict_features(features[test]), latency[test]),
        "baseline": metrics(predict_baseline(baseline, features[test]), latency[test]),
        "mlp_train": metrics(predictor.predict_features(features[train]), latency[train]),
        "heldout": {"arch": [samples[i]["arch"] for i in test], "measured_ms": latency[test].tolist(),
                    "mlp_ms": predictor.predict_features(features[test]).tolist(),
                    "baseline_ms": predict_baseline(baseline, features[test]).tolist()},
    }
    predictor.metrics = {k: report[k] for k in ("n_train", "n_heldout", "mlp", "baseline", "mlp_train")}
    return predictor, report


def _check_consistent(records: Sequence[dict[str, Any]]) -> None:
    first = records[0]["fingerprint"]
    for record in records[1:]:
        differences = fingerprint_differences(first, record["fingerprint"])
        if differences:
            raise UserError(f"latency data mixes setups ({'; '.join(differences)}); fit one engine/shape/device per file")
    spaces = {json.dumps(r.get("space"), sort_keys=True) for r in records}
    if len(spaces) > 1:
        raise UserError("latency data mixes search spaces; profile each space into its own file")


def predictions_per_second(predictor: LatencyPredictor, n: int = 1_500_000, seed: int = 0) -> float:
    """Throughput of `predict_features` on ``n`` random feature rows (the paper MLM grid has ~1.5M)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform([1, 128, 128, 1, 64], [8, 768, 3072, 12, 768], size=(n, 5))
    start = time.perf_counter()
    predictor.predict_features(x)
    return n / (time.perf_counter() - start)


def check(predictor: LatencyPredictor | str | Path, archs: Iterable[Arch | str], *, warmup: int = 3,
          repeats: int = 20) -> list[dict[str, Any]]:
    """Measure ``archs`` now, with the predictor's engine and shapes, next to its predictions."""
    if not isinstance(predictor, LatencyPredictor):
        predictor = LatencyPredictor.load(predictor)
    settings = _settings_of(predictor.fingerprint, warmup=warmup, repeats=repeats)
    rows = []
    for arch in archs:
        arch = Arch.parse(arch) if isinstance(arch, str) else arch
        measured = measure(arch, settings)["latency"]["median_ms"]
        predicted = predictor.predict(arch)
        rows.append({"arch": str(arch), "predicted_ms": predicted, "measured_ms": measured,
                     "error_pct": 100 * (predicted - measured) / measured})
    return rows


def _settings_of(fp: dict[str, Any], **timing: int) -> LatencySettings:
    """The settings a fingerprint was measured with (to re-measure or compare like with like)."""
    return LatencySettings(engine=fp.get("engine", "torch"), batch_size=fp.get("batch_size", 1),
                           seq_len=fp.get("seq_len", 128), threads=fp.get("threads", 1), clock=fp.get("clock", "wall"),
                           **timing)
