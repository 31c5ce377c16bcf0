"""The ``latency fit`` and ``latency check`` stages: MLP and FLOPs baseline on profile records, metrics."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..errors import UserError
from ..space import Arch
from .costs import COST_TERMS, design_inputs, features_of
from .hardware import fingerprint_differences
from .predictor import LatencyPredictor, linear_design, predict_linear
from .profiling import read_records
from .hardware import settings_of
from .timing import measure_many, torch_threads


def metrics(predicted: np.ndarray, measured: np.ndarray) -> dict[str, float]:
    """RMSE (ms), MAPE (%), mean signed error (%: negative when models measure slower than
    predicted, i.e. the predictor promises too much) and Spearman rank correlation."""
    from scipy.stats import spearmanr

    predicted, measured = np.asarray(predicted, float), np.asarray(measured, float)
    rho = spearmanr(predicted, measured).statistic if len(measured) > 1 else float("nan")
    return {"rmse_ms": float(np.sqrt(np.mean((predicted - measured) ** 2))),
            "mape_pct": float(100 * np.mean(np.abs(predicted - measured) / measured)),
            "signed_error_pct": float(100 * np.mean((predicted - measured) / measured)),
            "spearman": float(rho), "n": int(len(measured))}


def fit_baseline(features: np.ndarray, latency_ms: np.ndarray, seq_len: int = 128) -> dict[str, Any]:
    """Least-squares ``latency ≈ a·GFLOPs + b·layers + c``: the analytic FLOPs baseline."""
    coef, *_ = np.linalg.lstsq(linear_design("flops", features, seq_len), latency_ms, rcond=None)
    return {"formula": "a*GFLOPs + b*layers + c", "terms": "flops", "seq_len": seq_len, "coefficients": coef.tolist()}


def predict_baseline(baseline: dict[str, Any], features: np.ndarray) -> np.ndarray:
    return predict_linear({"terms": "flops", **baseline}, features, baseline["seq_len"])


def fit_costs(features: np.ndarray, latency_ms: np.ndarray, seq_len: int = 128) -> dict[str, Any]:
    """Non-negative least squares of latency on the work terms of `cost_terms` (scikit-learn's
    ``LinearRegression(positive=True)``), weighted by 1/latency² so that it minimises *relative*
    squared error (what MAPE measures) rather than the error of the slowest models.

    Non-negative per-unit costs keep it physical: it cannot predict that more work takes less time,
    so it extrapolates sanely from few samples where an MLP does not (issue 14: 30-60 samples).
    """
    from sklearn.linear_model import LinearRegression

    design = linear_design("costs", features, seq_len)[:, :-1]
    scale = np.where(design.max(0) > 0, design.max(0), 1.0)  # unit-free columns: better conditioned NNLS
    model = LinearRegression(positive=True).fit(design / scale, latency_ms, sample_weight=1.0 / latency_ms ** 2)
    coefficients = np.append(model.coef_ / scale, model.intercept_)
    return {"terms": "costs", "names": [*COST_TERMS, "intercept"], "seq_len": seq_len,
            "coefficients": coefficients.tolist()}


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


def split_indices(n: int, holdout: float, seed: int, source: str = "the latency data") -> tuple[np.ndarray, np.ndarray]:
    import torch

    if not 0 < holdout < 1:
        raise UserError(f"--holdout must be between 0 and 1; got {holdout}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    n_test = max(1, int(round(n * holdout)))
    if n - n_test < 5:
        raise UserError(f"{source}: only {n} measured architectures; profile at least {n_test + 5} (--samples) "
                        "before fitting")
    return order[n_test:], order[:n_test]


CANDIDATES = ("mlp", "costs", "flops")


def _fit_candidate(kind: str, features: np.ndarray, latency: np.ndarray, seq_len: int, hidden: int, epochs: int,
                   seed: int) -> Callable[[np.ndarray], np.ndarray]:
    """Fit one kind of predictor; returns its ``features -> ms`` function."""
    if kind == "mlp":
        predictor = _mlp_predictor(features, latency, seq_len, hidden, epochs, seed)
        return predictor.predict_features
    linear = fit_costs(features, latency, seq_len) if kind == "costs" else fit_baseline(features, latency, seq_len)
    return lambda x: predict_linear(linear, x, seq_len)


def _mlp_predictor(features, latency, seq_len, hidden, epochs, seed, **fields) -> LatencyPredictor:
    weights, biases, norm = fit_mlp(design_inputs(features, seq_len), latency, hidden=hidden, epochs=epochs, seed=seed)
    return LatencyPredictor(weights=weights, biases=biases, feature_mean=norm["feature_mean"],
                            feature_std=norm["feature_std"], target_mean=norm["target_mean"],
                            target_std=norm["target_std"], seq_len=seq_len, **{"fingerprint": {}, "space": {}, **fields})


def cross_validate(features: np.ndarray, latency: np.ndarray, seq_len: int, *, folds: int = 5, hidden: int = 64,
                   epochs: int = 3000, seed: int = 0, candidates: Sequence[str] = CANDIDATES) -> dict[str, dict]:
    """K-fold cross-validated MAPE / Spearman of each candidate kind (scikit-learn's ``KFold``, shuffled
    with ``seed``): out-of-fold predictions of every sample, scored together."""
    from sklearn.model_selection import KFold

    folds = max(2, min(folds, len(latency)))
    out_of_fold = {kind: np.empty(len(latency)) for kind in candidates}
    for train, test in KFold(folds, shuffle=True, random_state=seed).split(features):
        for kind in candidates:
            predict = _fit_candidate(kind, features[train], latency[train], seq_len, hidden, epochs, seed)
            out_of_fold[kind][test] = predict(features[test])
    return {kind: {**metrics(out_of_fold[kind], latency), "folds": folds} for kind in candidates}


def fit(data: str | Path | Sequence[dict[str, Any]], *, holdout: float = 0.2, seed: int = 0, hidden: int = 64,
        epochs: int = 3000, folds: int = 5, candidates: Sequence[str] = CANDIDATES) -> tuple[LatencyPredictor, dict[str, Any]]:
    """Fit every candidate (MLP, costs, FLOPs) on the non-reference records, choose one by K-fold
    cross-validation on the training split, and report all of them on a held-out split.

    The choice uses the training split only, so the held-out numbers are an honest estimate of the
    chosen predictor (and of each alternative). The saved predictor is the chosen kind trained on
    the whole training split; it also carries the MLP and the FLOPs baseline for comparison.
    """
    records = read_records(data) if isinstance(data, (str, Path)) else list(data)
    source = str(data) if isinstance(data, (str, Path)) else "the latency data"
    samples = [r for r in records if not r.get("reference")]
    references = [r for r in records if r.get("reference")]
    if not samples:
        raise UserError(f"{source}: no measured architectures; run 'autotinybert latency profile' first")
    unknown = set(candidates) - set(CANDIDATES)
    if unknown or not candidates:
        raise UserError(f"predictor candidates must be among {', '.join(CANDIDATES)}; got {list(candidates)}")
    _check_consistent(samples)
    features = features_of(Arch.parse(r["arch"]) for r in samples)
    corrected = drift_corrected_ms(records)
    latency = np.array([corrected[i] for i, r in enumerate(records) if not r.get("reference")], dtype=np.float64)
    if not np.all(np.isfinite(latency) & (latency > 0)):  # log-latency targets: nan predictors otherwise
        bad = samples[int(np.argmin(np.isfinite(latency) & (latency > 0)))]
        raise UserError(f"{source}: {bad['arch']} has latency {bad['latency']['median_ms']!r} ms; latencies must be "
                        "positive numbers (remeasure with 'latency profile')")
    train, test = split_indices(len(samples), holdout, seed, source)
    seq_len = int(samples[0]["fingerprint"].get("seq_len", 128))
    cv = cross_validate(features[train], latency[train], seq_len, folds=folds, hidden=hidden, epochs=epochs, seed=seed,
                        candidates=candidates)
    chosen = min(candidates, key=lambda kind: (cv[kind]["mape_pct"], CANDIDATES.index(kind)))
    baseline = fit_baseline(features[train], latency[train], seq_len)
    linear = {"costs": lambda: fit_costs(features[train], latency[train], seq_len), "flops": lambda: baseline,
              "mlp": lambda: None}[chosen]()
    predictor = _mlp_predictor(
        features[train], latency[train], seq_len, hidden, epochs, seed, fingerprint=samples[0]["fingerprint"],
        space=samples[0].get("space") or {},
        reference_ms=float(np.median([ms for ms, r in zip(corrected, records) if r.get("reference")]))
        if references else None,  # BERT-base, timed in several chunks of the profile: the median of them
        baseline=baseline, kind=chosen, linear=linear)
    predictions = {"mlp": lambda x: _as_kind(predictor, "mlp").predict_features(x),
                   "flops": lambda x: predict_baseline(baseline, x),
                   "costs": _fit_candidate("costs", features[train], latency[train], seq_len, hidden, epochs, seed)}
    heldout = {kind: metrics(predictions[kind](features[test]), latency[test]) for kind in CANDIDATES}
    report = {
        "n_train": int(len(train)), "n_heldout": int(len(test)), "chosen": chosen, "folds": cv[chosen]["folds"],
        "selected": metrics(predictor.predict_features(features[test]), latency[test]),
        "mlp": heldout["mlp"], "baseline": heldout["flops"], "costs": heldout["costs"],
        "cross_validation": cv,
        "mlp_train": metrics(predictions["mlp"](features[train]), latency[train]),
        "heldout": {"arch": [samples[i]["arch"] for i in test], "measured_ms": latency[test].tolist(),
                    "predicted_ms": predictor.predict_features(features[test]).tolist(),
                    **{f"{kind}_ms": predictions[kind](features[test]).tolist() for kind in ("mlp", "costs")},
                    "baseline_ms": predict_baseline(baseline, features[test]).tolist()},
    }
    predictor.metrics = {k: report[k] for k in ("n_train", "n_heldout", "chosen", "selected", "mlp", "baseline",
                                                "costs", "cross_validation", "mlp_train")}
    return predictor, report


def drift_corrected_ms(records: Sequence[dict[str, Any]], paced: bool = True) -> np.ndarray:
    """Each record's median latency as if the machine had run at its typical speed throughout.

    Records of a profile with a drift anchor carry the anchor's median in their chunk (``chunk``
    tells chunks apart; file order is time order); the typical speed is the median of those.
    Records that also carry ``paced`` (their timings divided by the anchor's of the same round,
    `runner.paced_summary`) are that ratio times the typical anchor: corrected round by round.
    ``paced=False``, or older records without it: chunk by chunk, the machine's speed at a chunk
    being the median anchor over that chunk and its two neighbours (one anchor timing is as noisy
    as any other: uncorrected, that noise made a loaded profile's fit worse, 8.0 % vs 7.4 % MAPE;
    smoothed, better: 6.4 %); a chunk timed on a machine ``x`` times slower than the typical anchor
    has its medians divided by ``x``. Records without an anchor (older files, `measure`) are used
    as measured.
    """
    measured = np.array([float(r["latency"]["median_ms"]) for r in records], dtype=np.float64)
    chunk_of, chunk_anchor, previous = [], [], None  # chunk index per record (-1: no anchor), anchor per chunk
    for record in records:
        anchor = record.get("anchor") or {}
        if not anchor.get("median_ms") or anchor["median_ms"] <= 0:
            chunk_of.append(-1)
            continue
        if (anchor.get("chunk"), anchor["median_ms"]) != previous:
            chunk_anchor.append(float(anchor["median_ms"]))
            previous = (anchor.get("chunk"), anchor["median_ms"])
        chunk_of.append(len(chunk_anchor) - 1)
    if not chunk_anchor:
        return measured
    speed = [float(np.median(chunk_anchor[max(0, c - 1):c + 2])) for c in range(len(chunk_anchor))]
    typical = float(np.median(chunk_anchor))

    def corrected(ms: float, chunk: int, record: dict[str, Any]) -> float:
        if chunk < 0:
            return ms
        if paced and record.get("paced"):
            return typical * record["paced"]["ratio"]  # round by round
        return ms * typical / speed[chunk]  # chunk by chunk
    return np.array([corrected(ms, c, r) for ms, c, r in zip(measured, chunk_of, records)])


def _as_kind(predictor: LatencyPredictor, kind: str) -> LatencyPredictor:
    return dataclasses.replace(predictor, kind=kind, linear=None if kind == "mlp" else predictor.linear)


def _check_consistent(records: Sequence[dict[str, Any]]) -> None:
    first = records[0]["fingerprint"]
    for record in records[1:]:
        differences = fingerprint_differences(first, record["fingerprint"])
        if differences:
            raise UserError(f"latency data mixes setups ({'; '.join(differences)}); fit one engine/shape/device per file")
    spaces = {json.dumps(r.get("space"), sort_keys=True) for r in records}
    if len(spaces) > 1:
        raise UserError("latency data mixes search spaces; profile each space into its own file")


def check(predictor: LatencyPredictor | str | Path, archs: Iterable[Arch | str], *, warmup: int = 3,
          repeats: int = 20, timing: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Measure ``archs`` now, with the predictor's engine, shapes and form, next to its predictions
    (``timing``: further `LatencySettings` fields such as ``tolerance``)."""
    if not isinstance(predictor, LatencyPredictor):
        predictor = LatencyPredictor.load(predictor)
    settings = settings_of(predictor.fingerprint, warmup=warmup, repeats=repeats, **(timing or {}))
    archs = [Arch.parse(a) if isinstance(a, str) else a for a in archs]
    rows = []
    for arch, record in zip(archs, measure_many(archs, settings)):  # interleaved: load hits all alike
        measured = record["latency"]["median_ms"]
        predicted = predictor.predict(arch)
        rows.append({"arch": str(arch), "predicted_ms": predicted, "measured_ms": measured,
                     "error_pct": 100 * (predicted - measured) / measured, "noise": record["latency"]["noise"]})
    return rows
