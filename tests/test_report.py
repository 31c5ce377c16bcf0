"""report: a self-contained HTML page, a markdown summary, model cards; reads files only."""

import json
import re
import shutil
import subprocess

import pytest

from autotinybert.cli import main
from autotinybert.develop import develop, final_models, validate_config
from develop_fixtures import tiny_config


def _quiet(_message):
    pass


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    config = validate_config(tiny_config(root / "fixtures"))
    develop(config, root / "run", log=_quiet)
    return root / "run"


def test_report_is_self_contained_html_with_plots_and_tables(finished_run, capsys):
    shutil.rmtree(finished_run / "report")
    assert main(["report", str(finished_run)]) == 0
    html = (finished_run / "report" / "index.html").read_text()
    assert len(re.findall(r'<img alt="[^"]*" src="data:image/png;base64,', html)) == 4
    # No external assets: every src/href is inline data.
    assert not re.search(r'(src|href)="(?!data:)', html)
    assert "<link" not in html and "<script" not in html
    for heading in ("Search space", "Exported models", "Pareto front", "Predicted vs measured latency",
                    "Training curves", "Downstream tasks", "Cost of each stage"):
        assert heading in html
    summary = (finished_run / "report" / "summary.md").read_text()
    assert "| data |" in summary and "SST-2" in summary and "CPU hours" in summary
    assert all((finished_run / "report" / f"{name}.png").is_file() for name in ("pareto", "latency", "training", "downstream"))


def test_every_exported_checkpoint_has_a_model_card(finished_run):
    manifest = json.loads((finished_run / "manifest.json").read_text())
    extracted = manifest["stages"]["extract"]["outputs"]["models"]
    for path, final in [*((p, True) for p in final_models(manifest).values()),
                        *((m["path"], False) for m in extracted.values())]:
        card = (finished_run / path / "README.md").read_text()
        for fragment in ("## Architecture", "parameters", "FLOPs", "Measured median", "logical CPUs",
                         "## Scores", "## How it was produced", "sst2 dev" if final else "further-trained version"):
            assert fragment in card, (fragment, card)


def test_a_moved_run_still_reports(finished_run, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(finished_run, moved)
    from autotinybert.report import build_report

    build_report(moved)
    summary = (moved / "report" / "summary.md").read_text()
    assert str(moved) in summary and str(finished_run) not in summary
    assert summary.count("![") == 4


def test_report_reads_files_only(finished_run, monkeypatch):
    import torch

    def no_models(*args, **kwargs):
        raise AssertionError("report must not load models")

    monkeypatch.setattr(torch, "load", no_models)
    monkeypatch.setattr("autotinybert.checkpoint.load_supernet", no_models)
    from autotinybert.report import build_report

    build_report(finished_run, finished_run / "report2")
    assert (finished_run / "report2" / "index.html").is_file()


def test_report_of_a_non_run_is_a_one_line_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "manifest.json" in err


def test_report_opens_in_headless_chromium(finished_run, tmp_path):
    """Screenshot the page in a real browser (skipped where no Chromium is installed)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no chromium / google-chrome on PATH (apt-get install chromium)")
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1200,3000",
                    (finished_run / "report" / "index.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 20_000  # a blank page is a few kB


def test_the_report_gives_the_held_out_error_of_the_predictor_cross_validation_chose():
    from autotinybert.report import _latency_text

    fit = {"n_heldout": 8, "chosen": "costs", "selected": {"mape_pct": 8.75, "rmse_ms": 2.04, "spearman": 0.976},
           "mlp": {"mape_pct": 12.59, "rmse_ms": 3.54, "spearman": 0.976}}
    text = _latency_text({"latency_fit": fit})
    assert "Predictor (costs)" in text and "MAPE 8.75%" in text and "12.59" not in text
    older = _latency_text({"latency_fit": {"n_heldout": 8, "mlp": fit["mlp"]}})  # fits before the choice existed
    assert "Predictor (mlp)" in older and "MAPE 12.59%" in older
