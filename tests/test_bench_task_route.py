"""bench/task_route.py: the baselines' architectures, the correlation sample, and that a finished
run is kept and skipped."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np

from autotinybert.space import Arch, Dim, SearchSpace

_BENCH = Path(__file__).resolve().parents[1] / "bench"
_spec = importlib.util.spec_from_file_location("task_route", _BENCH / "task_route.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

SPACE = SearchSpace(mode="kd", layers=Dim(1, 6), hidden=Dim(128, 384, 4), ffn=Dim(128, 1536, 4), heads=Dim(12, 12),
                    qkv=Dim(84, 384, 12))


def _ms(arch: Arch) -> float:  # a latency law: per layer, linear in the hidden and FFN sizes
    return arch.num_hidden_layers * (arch.hidden_size + arch.intermediate_size / 4) / 100


class _Predictor:
    def predict(self, arch: Arch) -> float:
        return _ms(arch)

    def predict_features(self, features: np.ndarray) -> np.ndarray:
        return np.array([_ms(Arch(*map(int, row))) for row in features])


def test_the_baselines_are_the_largest_of_their_shape_under_the_target():
    target = _ms(SPACE.largest()) / 3  # 3x faster than the source (L6-H384-F1536: 6 x 7.68 ms)
    ratio = bench.bert_ratio(SPACE, target, _ms)
    assert ratio.intermediate_size == 4 * ratio.hidden_size and ratio.qkv_size == ratio.hidden_size
    assert _ms(ratio) <= target < _ms(Arch(ratio.num_hidden_layers, ratio.hidden_size + 12, 4 * ratio.hidden_size + 48,
                                           12, ratio.hidden_size + 12))
    drop = bench.layer_drop(SPACE, target, _ms)
    assert drop == Arch(2, 384, 1536, 12, 384)  # full width, the most layers under 15.36 ms
    assert bench.bert_ratio(SPACE, 0.5, _ms) is None  # nothing of that shape is fast enough


def test_the_correlation_sample_spans_the_depths_of_the_window():
    target = _ms(SPACE.largest()) / 3
    archs = bench.correlate_sample(None, _Predictor(), SPACE, target, 16)
    assert len(set(archs)) == 16
    depths = {Arch.parse(a).num_hidden_layers for a in archs}
    assert len(depths) >= 3
    assert all(0.85 * target <= _ms(Arch.parse(a)) <= target for a in archs)


def test_a_finished_final_run_is_kept_and_skipped(tmp_path, monkeypatch):
    args = argparse.Namespace(work=tmp_path, final_tag="")
    task = type("Task", (), {"name": "sst2"})()
    record = {"score": 91.0, "arch": "L2-H128-F256-A12-Q96"}
    path = tmp_path / "sst2" / "final" / "3x-searched-L2-H128-F256-A12-Q96-seed0.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(record))
    monkeypatch.setattr(bench, "finetune_settings", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    assert bench.stage_final(args, task, "3x", "searched", "L2-H128-F256-A12-Q96", 0) == record
    # Another final budget (--final-tag) keeps its own records: the recorded run is not reused for it.
    args.final_tag, args.summary_only = "e10", True  # summary only: None where no record of that budget exists
    assert bench.stage_final(args, task, "3x", "searched", "L2-H128-F256-A12-Q96", 0) is None
