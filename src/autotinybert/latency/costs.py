"""Analytic matmul cost of an architecture and the predictor's inputs derived from it (no torch)."""

from __future__ import annotations

from typing import Iterable

import numpy as np

from ..space import FEATURE_NAMES, Arch


def features_of(archs: Iterable[Arch]) -> np.ndarray:
    """(N, 5) float64 rows in `FEATURE_NAMES` order: layers, hidden, ffn, heads, qkv."""
    return np.array([[getattr(a, name) for name in FEATURE_NAMES] for a in archs], dtype=np.float64).reshape(-1, 5)


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
    noisy points. On our torch profile this cut held-out MAPE from ~5-6% to ~4% (docs/results/latency-records.md).
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


COST_TERMS = ("projection_gmacs", "ffn_gmacs", "attention_gmacs", "hidden_melements", "ffn_melements",
              "score_melements", "layers", "pooler_gmacs")


def cost_terms(features: np.ndarray, seq_len: int) -> np.ndarray:
    """(N, 5) hyper-parameters -> (N, 8) work terms of one forward, each linear in time on a CPU.

    Matmuls (billions of multiply-accumulates): Q/K/V/output projections ``L·T·4·d_m·d_qkv``, FFN
    ``L·T·2·d_m·d_f``, attention scores and context ``L·T²·2·d_qkv``, pooler ``d_m²``; element-wise
    work (millions of elements: LayerNorm / residual ``L·T·d_m``, GELU ``L·T·d_f``, softmax
    ``L·T²·h``) and a per-layer overhead (operator dispatch). A non-negative combination of these
    is the "costs" predictor (`fitting.fit_costs`): an analytic model whose coefficients are
    per-unit costs measured on the device.
    """
    L, d, f, h, q = (features[:, i].astype(np.float64) for i in range(5))
    T = float(seq_len)
    return np.column_stack([L * T * 4 * d * q / 1e9, L * T * 2 * d * f / 1e9, L * T * T * 2 * q / 1e9,
                            L * T * d / 1e6, L * T * f / 1e6, L * T * T * h / 1e6, L, d * d / 1e9])
