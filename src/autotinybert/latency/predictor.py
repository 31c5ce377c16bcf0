"""The latency predictor: an MLP evaluated with numpy, stored as plain JSON (never pickle)."""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..errors import SetupWarning, UserError
from ..files import atomic_write_json
from ..space import FEATURE_NAMES, Arch, SearchSpace
from .costs import INPUT_NAMES, cost_terms, design_inputs, features_of, flops_array
from .hardware import fingerprint, fingerprint_differences
from .hardware import settings_of

PREDICTOR_FORMAT = "autotinybert-latency-predictor"
# 2: the predictor is the one chosen by cross-validation ("kind": mlp, costs or flops), the deployed
# form is in the fingerprint. Version-1 files (always an MLP) still load.
PREDICTOR_VERSION = 2
KINDS = ("mlp", "costs", "flops")


@dataclasses.dataclass
class LatencyPredictor:
    """Latency from (L, d_m, d_f, h, d_qkv), with the fingerprint (device, engine, deployed form),
    space and BERT-base latency it was fitted with; numpy only (no torch needed).

    ``kind`` is what cross-validation chose (`fitting.fit`): ``mlp`` (paper §4.1, official
    ``latency_predictor``: an MLP on normalised features plus analytic log-costs, `design_inputs`,
    predicting standardised log-latency), ``costs`` (a non-negative linear model of the work terms
    of `cost_terms`) or ``flops`` (``a·GFLOPs + b·layers + c``). ``linear`` holds the
    coefficients of the two linear kinds."""

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
    kind: str = "mlp"
    linear: dict[str, Any] | None = None

    # --- prediction ------------------------------------------------------------------------
    def predict_features(self, features: np.ndarray, chunk: int = 16384) -> np.ndarray:
        """Latency in ms for (N, 5) feature rows; vectorised (scores millions of rows per second).

        float32 in cache-sized chunks: the search only ranks and windows candidates, and float32
        GEMMs are several times faster than float64 here.
        """
        features = np.asarray(features, dtype=np.float64).reshape(-1, 5)
        if self.kind != "mlp":
            return predict_linear(self.linear, features, self.seq_len)
        x = design_inputs(features, self.seq_len)  # (N, 8)
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
            current = fingerprint(settings_of(fp))
        differences = fingerprint_differences(self.fingerprint, current)
        if differences:
            warnings.warn("latency predictor was measured on a different device or setup ("
                          + "; ".join(differences) + "); its predictions may not hold here, "
                          "re-run 'autotinybert latency profile' and 'fit' on this machine", SetupWarning, stacklevel=2)
        return differences

    def covers(self, arch: Arch) -> bool:
        """Whether ``arch`` lies in the space the predictor was profiled on (else it extrapolates)."""
        return SearchSpace.from_dict(self.space).contains(arch)

    def check_space(self, space: SearchSpace) -> None:
        if space.to_dict() != self.space:
            raise UserError(f"--space: the latency predictor was fitted on another space ({brief_space(self.space)}, not "
                            f"{brief_space(space.to_dict())}); profile and fit a predictor for this space")

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
            "baseline": self.baseline, "metrics": self.metrics, "kind": self.kind, "linear": self.linear,
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
        version = data.get("version")
        if isinstance(version, int) and version > PREDICTOR_VERSION:
            raise UserError(f"{source} is a version-{version} latency predictor, written by a newer autotinybert "
                            f"(this one reads versions 1-{PREDICTOR_VERSION}); upgrade autotinybert or {fix}")
        if version not in (1, PREDICTOR_VERSION) or data.get("inputs") != list(INPUT_NAMES):
            raise UserError(f"{source} has predictor version {version} / inputs "
                            f"{data.get('inputs')}, not {PREDICTOR_VERSION} / {list(INPUT_NAMES)}; {fix}")
        kind = data.get("kind", "mlp")  # version 1: always the MLP
        if kind not in KINDS:
            raise UserError(f"{source} is a latency predictor of unknown kind {kind!r}; {fix}")
        try:
            weights = [np.asarray(layer["weight"], dtype=np.float64) for layer in data["layers"]]
            biases = [np.asarray(layer["bias"], dtype=np.float64) for layer in data["layers"]]
            predictor = cls(weights=weights, biases=biases,
                            feature_mean=np.asarray(data["feature_mean"], dtype=np.float64),
                            feature_std=np.asarray(data["feature_std"], dtype=np.float64),
                            target_mean=float(data["target_mean"]), target_std=float(data["target_std"]),
                            fingerprint=dict(data["fingerprint"]), space=dict(data["space"]), seq_len=int(data["seq_len"]),
                            reference_ms=None if data.get("reference_ms") is None else float(data["reference_ms"]),
                            baseline=data.get("baseline"), metrics=dict(data.get("metrics") or {}), kind=kind,
                            linear=data.get("linear"))
            if kind != "mlp":
                predict_linear(predictor.linear, np.ones((1, 5)), predictor.seq_len)  # checks the coefficients
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


def predictions_per_second(predictor: LatencyPredictor, n: int = 1_500_000, seed: int = 0) -> float:
    """Throughput of `predict_features` on ``n`` random feature rows (the paper MLM grid has ~1.5M)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform([1, 128, 128, 1, 64], [8, 768, 3072, 12, 768], size=(n, 5))
    start = time.perf_counter()
    predictor.predict_features(x)
    return n / (time.perf_counter() - start)


def brief_space(space: dict[str, Any]) -> str:
    """A space in a few words: mode and the ranges (``mlm L1-3 H12-36 F13-37 A1-4``)."""
    letters = {"layers": "L", "hidden": "H", "ffn": "F", "heads": "A", "qkv": "Q"}
    ranges = [f"{letters[k]}{v['min']}-{v['max']}" for k, v in space.items() if k in letters and isinstance(v, dict)]
    return " ".join([str(space.get("mode", "?")), *ranges])


# --- the linear kinds ----------------------------------------------------------------------------
def linear_design(terms: str, features: np.ndarray, seq_len: int) -> np.ndarray:
    """Columns of a linear predictor: ``flops`` = (GFLOPs, layers, 1); ``costs`` = `cost_terms` and 1."""
    if terms == "flops":
        return np.stack([flops_array(features, 1, seq_len) / 1e9, features[:, 0], np.ones(len(features))], axis=1)
    if terms == "costs":
        return np.column_stack([cost_terms(features, seq_len), np.ones(len(features))])
    raise ValueError(f"unknown linear terms {terms!r}")


def predict_linear(linear: dict[str, Any], features: np.ndarray, seq_len: int) -> np.ndarray:
    """Latency in ms of a linear predictor ``{"terms": ..., "coefficients": [...]}``."""
    design = linear_design(linear["terms"], features, seq_len)
    coefficients = np.asarray(linear["coefficients"], dtype=np.float64)
    if coefficients.shape != (design.shape[1],) or not np.isfinite(coefficients).all():
        raise ValueError(f"{linear['terms']} predictor needs {design.shape[1]} finite coefficients")
    return design @ coefficients
