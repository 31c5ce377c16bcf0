"""The search's fine-tuning evaluator, worker processes and `search correlate` on a tiny SuperPLM."""

from __future__ import annotations

import json
import warnings

import pytest
from conftest import TINY_MLM
from tasks_fixtures import glue_layout, save_tiny_superplm
from test_search import _toy_predictor

from autotinybert.cli import main
from autotinybert.errors import UserError
from autotinybert.space import Arch

FAST_FT = ["--task", "sst2", "--ft-max-steps", "3", "--ft-batch-size", "4", "--ft-max-seq-length", "32",
           "--ft-lr", "1e-3"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny SuperPLM with a real tokenizer, tiny GLUE files, held-out text and a toy predictor."""
    from test_data import TEXT

    root = tmp_path_factory.mktemp("search-ft")
    save_tiny_superplm(root / "superplm")
    glue_layout(root)
    (root / "valid.txt").write_text(TEXT * 10, encoding="utf-8")
    _toy_predictor(root / "pred.json", TINY_MLM)
    return root


def _evaluator(files, **settings):
    from autotinybert.evaluators import FinetuneEvaluator
    from autotinybert.tasks.finetune import FinetuneSettings

    return FinetuneEvaluator(files / "superplm", ["sst2", "mrpc"], files / "glue_data",
                             settings=FinetuneSettings(max_steps=3, batch_size=4, max_seq_length=32, learning_rate=1e-3,
                                                       **settings))


def test_finetune_evaluator_is_deterministic_and_keyed_by_its_settings(files, tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)
    evaluator = _evaluator(files)
    weights = {k: v.clone() for k, v in evaluator.model.state_dict().items()}
    arch = Arch(2, 24, 25, 2, 18)
    first = evaluator(arch)
    assert set(evaluator.last_scores) == {"sst2", "mrpc"}
    assert first == pytest.approx(sum(evaluator.last_scores.values()) / 2)
    assert 0.0 <= first <= 100.0
    assert evaluator(arch) == first  # same seed, same score
    assert all(torch.equal(v, weights[k]) for k, v in evaluator.model.state_dict().items())  # SuperPLM untouched
    assert list(tmp_path.iterdir()) == []  # in memory: no checkpoint per candidate
    assert _evaluator(files, seed=7).key != evaluator.key
    assert _evaluator(files).key == evaluator.key


def test_finetune_evaluator_bad_input(files):
    from autotinybert.evaluators import FinetuneEvaluator

    with pytest.raises(UserError, match="at least one --task"):
        FinetuneEvaluator(files / "superplm", [], files / "glue_data")
    with pytest.raises(UserError, match="unknown task"):
        FinetuneEvaluator(files / "superplm", ["sst3"], files / "glue_data")
    with pytest.raises(UserError, match="--data-dir"):
        FinetuneEvaluator(files / "superplm", ["sst2"], None)


def _search_argv(files, out, *extra):
    from autotinybert.latency import LatencyPredictor

    middle = LatencyPredictor.load(files / "pred.json").predict(Arch(2, 24, 25, 2, 18))
    return ["search", "--supernet", str(files / "superplm"), "--predictor", str(files / "pred.json"),
            "--target-ms", f"{middle:.4f}", "--method", "evolved", "--generations", "2", "--generation-size", "3",
            "--grid-step-hidden", "4", "--grid-step-ffn", "4", "--data-dir", str(files / "glue_data"),
            "--out", str(out), "--no-progress", "--no-plot", *extra]


def _fitness_by_arch(out):
    return {r["arch"]: r["fitness"] for r in json.loads((out / "state.json").read_text())["evaluations"]}


def test_cli_search_with_finetune_evaluator_in_one_and_two_processes(files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_search_argv(files, one, "--evaluator", "finetune", *FAST_FT)) == 0, capsys.readouterr().err
    capsys.readouterr()
    state = json.loads((one / "state.json").read_text())
    assert state["evaluator"].startswith("finetune:sst2:") and len(state["evaluations"]) == 6
    assert all(0.0 <= r["fitness"] <= 100.0 for r in state["evaluations"])
    # Two worker processes: the same architectures, the same fitness values, in the same order.
    assert main(_search_argv(files, two, "--evaluator", "finetune", "--workers", "2", *FAST_FT)) == 0, \
        capsys.readouterr().err
    assert list(_fitness_by_arch(two).items()) == list(_fitness_by_arch(one).items())
    assert json.loads((two / "best.json").read_text()) == json.loads((one / "best.json").read_text())
    # Resume evaluates nothing again.
    assert main(_search_argv(files, one, "--evaluator", "finetune", *FAST_FT, "--resume")) == 0
    assert "0 new evaluations" in capsys.readouterr().out


def test_cli_search_correlate_reports_spearman_and_resumes(files, tmp_path, capsys):
    from scipy import stats

    out = tmp_path / "corr"
    argv = ["search", "correlate", "--supernet", str(files / "superplm"), "--valid-corpus", str(files / "valid.txt"),
            "--cache-dir", str(tmp_path / "cache"), "--seq-len", "24", "--eval-batch-size", "4", "--eval-batches", "2",
            "--data-dir", str(files / "glue_data"), *FAST_FT, "--samples", "5", "--grid-step-hidden", "4",
            "--grid-step-ffn", "4", "--out", str(out), "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    summary = json.loads((out / "correlate.json").read_text())
    rows = summary["rows"]
    assert summary["samples"] == len(rows) == len({r["arch"] for r in rows}) == 5
    assert all(TINY_MLM.contains(Arch.parse(r["arch"])) for r in rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a constant side makes it NaN: reported as None
        expected = stats.spearmanr([r["proxy"] for r in rows], [r["finetune"] for r in rows]).statistic
    assert summary["spearman"] == (pytest.approx(expected) if expected == expected else None)
    assert "Spearman" in printed and rows[0]["arch"] in printed
    states = {kind: json.loads((out / f"{kind}-state.json").read_text()) for kind in ("proxy", "finetune")}
    assert all(len(s["evaluations"]) == 5 for s in states.values())
    # Resume: the same numbers, nothing evaluated again.
    assert main(argv + ["--resume"]) == 0
    capsys.readouterr()
    assert json.loads((out / "correlate.json").read_text()) == summary
    assert {k: len(json.loads((out / f"{k}-state.json").read_text())["evaluations"]) for k in states} == \
        {"proxy": 5, "finetune": 5}


def test_correlation_summary_hand_cases():
    from autotinybert.search_stage import correlation_summary

    archs = [(f"L1-H12-F13-A{h}-Q{9 * h}", None) for h in range(1, 5)]
    # Ranks (1 2 3 4) vs (1 2 4 3): Spearman 1 - 6·2 / (4·15) = 0.8, Kendall (5 - 1) / 6.
    summary = correlation_summary(archs, {"proxy": [0.1, 0.2, 0.3, 0.4]}, [10.0, 20.0, 40.0, 30.0])
    assert summary["spearman"] == pytest.approx(0.8) and summary["kendall"] == pytest.approx(4 / 6)
    # The proxy picks the fourth (30.0) where the third is best (40.0): top-1 regret 10.
    assert summary["fitness"]["proxy"]["pick"] == archs[3][0] and summary["fitness"]["proxy"]["top1_regret"] == 10.0
    assert correlation_summary(archs, {"proxy": [0.4, 0.3, 0.2, 0.1]}, [1.0, 2.0, 3.0, 4.0])["spearman"] == \
        pytest.approx(-1.0)
    # Every fitness is reported; the first one also at the top level.
    both = correlation_summary(archs, {"task": [1.0, 2.0, 4.0, 3.0], "proxy": [0.4, 0.3, 0.2, 0.1]},
                               [10.0, 20.0, 40.0, 30.0])
    assert both["spearman"] == pytest.approx(1.0) and both["fitness"]["task"]["top1_regret"] == 0.0
    assert both["fitness"]["proxy"]["spearman"] == pytest.approx(-0.8) and both["rows"][2]["task"] == 4.0
    constant = correlation_summary(archs, {"proxy": [0.1, 0.2, 0.3, 0.4]}, [50.0] * 4)
    assert constant["spearman"] is None and constant["kendall"] is None  # undefined, not NaN in the JSON
    assert [r["finetune"] for r in constant["rows"]] == [50.0] * 4


@pytest.mark.parametrize("extra, fragment", [
    (["--samples", "2"], "--samples must be at least 3"),
    (["--samples", "4", "--speedup", "2"], "--speedup / --target-ms need --predictor"),
    (["--samples", "4"], "at least one --task"),
])
def test_cli_search_correlate_bad_input_is_one_line(files, tmp_path, capsys, extra, fragment):
    code = main(["search", "correlate", "--supernet", str(files / "superplm"), "--valid-corpus", str(files / "valid.txt"),
                 "--cache-dir", str(tmp_path / "cache"), "--seq-len", "24", "--data-dir", str(files / "glue_data"),
                 "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert fragment in err, err
