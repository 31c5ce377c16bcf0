"""bench/from_pretrained.py: the BERT-ratio reference architecture at a latency target."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from autotinybert.space import Arch, Dim, SearchSpace

_BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(_BENCH))  # the bench imports its sibling jobs.py
_spec = importlib.util.spec_from_file_location("from_pretrained", _BENCH / "from_pretrained.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

# all-MiniLM-L6-v2's kd space: 12 heads, Q on a step-12 grid
SPACE = SearchSpace(mode="kd", layers=Dim(1, 6), hidden=Dim(128, 384, 4), ffn=Dim(128, 1536, 4), heads=Dim(12, 12),
                    qkv=Dim(84, 384, 12))


def _ms(arch: Arch) -> float:  # a latency law: per layer, proportional to the hidden size
    return arch.num_hidden_layers * arch.hidden_size / 100


def test_bert_ratio_is_the_widest_bert_shape_under_the_target_at_the_searched_depth():
    arch = bench.bert_ratio(SPACE, 4, 10.0, _ms)
    assert arch == Arch(4, 240, 960, 12, 240)  # 4 x 2.40 <= 10 < 4 x 2.52; H a multiple of the 12 heads
    assert _ms(Arch(4, 252, 1008, 12, 252)) > 10.0


def test_bert_ratio_goes_shallower_when_no_width_of_the_searched_depth_fits():
    assert bench.bert_ratio(SPACE, 6, 5.5, _ms) == Arch(4, 132, 528, 12, 132)  # depth 6 and 5 need H <= 110


CHOSEN = {"2x": {"ordered": "L6-H384-F768-A12-Q192", "bert": "L6-H288-F1152-A12-Q288"},
          "3x": {"ordered": "L6-H256-F512-A12-Q156", "bert": "L5-H240-F960-A12-Q240"}}


def test_models_restricts_fine_tuning_to_the_named_models():
    args = bench.parse_args(["--work", "w", "--corpus", "c", "--glue", "g", "--cache-dir", "x",
                             "--models", "3x-bert", "2x-ordered"])
    assert bench.selected_models(args, CHOSEN) == {"2x": {"ordered": CHOSEN["2x"]["ordered"]},
                                                   "3x": {"bert": CHOSEN["3x"]["bert"]}}
    every = bench.parse_args(["--work", "w", "--corpus", "c", "--glue", "g", "--cache-dir", "x"])
    assert bench.selected_models(every, CHOSEN) == CHOSEN


def test_models_refuses_a_name_the_run_does_not_hold():
    import pytest

    args = bench.parse_args(["--work", "w", "--corpus", "c", "--glue", "g", "--cache-dir", "x", "--models", "4x-bert"])
    with pytest.raises(SystemExit, match="no model 4x-bert"):
        bench.selected_models(args, CHOSEN)


def test_task_kd_fine_tunes_each_model_again_with_the_same_seeds_fine_tuned_source_as_teacher(tmp_path):
    args = bench.parse_args(["--work", str(tmp_path), "--corpus", "c", "--glue", "g", "--cache-dir", "x",
                             "--seeds", "1", "2", "--task-kd"])
    jobs = {job.name: job for job in bench.finetune_jobs(args, {"3x": {"ordered": CHOSEN["3x"]["ordered"]}},
                                                           tmp_path / "source")}
    assert sorted(jobs) == sorted(f"finetune-{run}-seed{s}" for s in (1, 2)
                                  for run in ("source", "3x-ordered", "3x-ordered+kd"))
    kd = jobs["finetune-3x-ordered+kd-seed2"].argv
    assert kd[kd.index("--teacher") + 1] == str(tmp_path / "finetune" / "source" / "seed2")
    assert "--teacher" not in jobs["finetune-3x-ordered-seed2"].argv
    (tmp_path / "models" / "3x-ordered").mkdir(parents=True)
    (tmp_path / "models" / "3x-ordered" / "config.json").write_text("{}")
    assert jobs["finetune-3x-ordered-seed2"].ready() and not jobs["finetune-3x-ordered+kd-seed2"].ready()
    (tmp_path / "finetune" / "source" / "seed2").mkdir(parents=True)
    results = tmp_path / "finetune" / "source" / "seed2" / "results.json"
    results.write_text('{"tasks": {"sst2": {"score": 80.0}}}')
    assert not jobs["finetune-3x-ordered+kd-seed2"].ready()  # its teacher has scored one task of five
    results.write_text('{"tasks": {"%s": {"score": 80.0}}}' % '": {"score": 80.0}, "'.join(args.tasks))
    assert jobs["finetune-3x-ordered+kd-seed2"].ready()  # once its teacher's run is finished
