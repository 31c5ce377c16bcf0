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

Modules, each importing only those above it:

* ``settings``  `LatencySettings`: engine, shapes, threads, repeats, clock.
* ``hardware``  `fingerprint` of a measurement and the differences that make latencies incomparable.
* ``costs``     analytic FLOPs and the predictor's inputs (no torch).
* ``timing``    the deployable encoder, torch / ONNX Runtime timing, `measure`.
* ``predictor`` `LatencyPredictor`: numpy forward pass, JSON file format, checks.
* ``profiling`` the resumable `profile` stage and its JSONL records.
* ``fitting``   the `fit` (MLP + FLOPs baseline, held-out metrics) and `check` stages.
* ``compare``   `compare_models`: shipped files (checkpoint folders, .onnx) timed against a reference.

Everything callers use is re-exported here: ``from autotinybert.latency import X`` keeps working.
"""

from __future__ import annotations

from .costs import DERIVED_INPUTS, INPUT_NAMES, design_inputs, features_of, flops, flops_array
from .fitting import check, drift_corrected_ms, fit, fit_baseline, fit_mlp, metrics, predict_baseline, split_indices
from .hardware import fingerprint, fingerprint_differences
from .predictor import PREDICTOR_FORMAT, PREDICTOR_VERSION, LatencyPredictor, predictions_per_second
from .profiling import plan_architectures, profile, read_records, write_output_config
from ..settings import CLOCKS, ENGINES, LatencySettings
from .hardware import settings_of
from .runner import load_average
from .timing import build_model, measure, measure_many, summarize, torch_threads
from .compare import compare_models, compare_table

__all__ = [
    "CLOCKS", "DERIVED_INPUTS", "ENGINES", "INPUT_NAMES", "PREDICTOR_FORMAT", "PREDICTOR_VERSION",
    "LatencyPredictor", "LatencySettings", "build_model", "check", "compare_models", "compare_table", "design_inputs",
    "drift_corrected_ms", "features_of",
    "fingerprint",
    "fingerprint_differences", "fit", "fit_baseline", "fit_mlp", "flops", "flops_array", "load_average", "measure",
    "measure_many",
    "metrics",
    "plan_architectures", "predict_baseline", "predictions_per_second", "profile", "read_records", "settings_of",
    "split_indices", "summarize", "torch_threads", "write_output_config",
]
