"""`autotinybert latency compare`: shipped models timed against a reference as a user would (issue 20)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertModel

from autotinybert.cli import main
from autotinybert.latency import compare
from autotinybert.latency.runner import time_interleaved

SEQ = ["--seq-len", "16"]  # the tiny models take at most 40 tokens


def _config(layers: int) -> BertConfig:
    return BertConfig(vocab_size=99, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                      intermediate_size=37, max_position_embeddings=40)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """A tiny encoder folder, a tiny classifier folder, and the encoder as ONNX (when onnxruntime is installed)."""
    root = tmp_path_factory.mktemp("shipped")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = BertModel(_config(1)).eval()
        BertForSequenceClassification(_config(2)).eval().save_pretrained(root / "classifier")
    encoder.save_pretrained(root / "encoder")
    paths = {"encoder": root / "encoder", "classifier": root / "classifier"}
    try:
        import onnxruntime  # noqa: F401

        from autotinybert.deploy import onnx_forms, quantize_onnx

        forms = onnx_forms(encoder, root / "onnx")  # fp32, optimized, int8 (= optimised, then quantised)
        paths.update({"onnx": forms["fp32"], "onnx-opt": forms["optimized"], "onnx-opt-int8": forms["int8"],
                      "onnx-int8": quantize_onnx(forms["fp32"], root / "onnx" / "model.int8.onnx")})
    except ImportError:
        pass
    return paths


def _run(capsys, *argv):
    code = main(["latency", "compare", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_speedup_is_the_median_of_per_round_ratios_and_the_reference_runs_every_round(capsys, tmp_path, shipped,
                                                                                      monkeypatch):
    """A scripted clock: the classifier takes exactly 2 ms, the reference 1 ms (the real models run, the
    clock says how long): speed-up 0.5, and every round times each model once, the reference included."""
    log: list[int] = []
    clock = [0.0]
    cost_ms = {0: 1.0, 1: 2.0, 2: 1.0}  # 0: the reference; 1: the classifier; 2: the reference again, as a model

    def scripted(runs, **kwargs):
        def wrap(key, run):
            def call():
                run()
                log.append(key)
                clock[0] += cost_ms[key] / 1000.0
            return call
        return time_interleaved({key: wrap(key, run) for key, run in runs.items()},
                                **{**kwargs, "timer": lambda: clock[0]})

    monkeypatch.setattr(compare, "time_interleaved", scripted)
    out_file = tmp_path / "compare.json"
    code, out, err = _run(capsys, "--model", shipped["classifier"], shipped["encoder"], "--reference",
                          shipped["encoder"], "--warmup", "1", "--out", out_file, *SEQ)
    assert code == 0, err
    result = json.loads(out_file.read_text())
    rows = {row["path"]: row for row in result["models"] if not row["reference"]}
    reference = result["models"][0]
    assert reference["reference"] and reference["speedup"] == 1.0 and reference["median_ms"] == pytest.approx(1.0)
    assert rows[str(shipped["classifier"])]["speedup"] == pytest.approx(0.5)
    assert rows[str(shipped["classifier"])]["median_ms"] == pytest.approx(2.0)
    assert rows[str(shipped["classifier"])]["class"] == "BertForSequenceClassification"
    assert rows[str(shipped["encoder"])]["speedup"] == pytest.approx(1.0)
    assert result["shape"] == {"batch_size": 1, "seq_len": 16, "threads": 1, "clock": "wall", "warmup": 1,
                               "rounds": 15, "input_vocab": 99}
    rounds = [log[i:i + 3] for i in range(3, len(log), 3)]  # after one warm-up call each
    assert len(rounds) == 15 and all(sorted(r) == [0, 1, 2] for r in rounds)  # every model, the reference too
    assert len({tuple(r) for r in rounds}) > 1  # shuffled
    assert all(row["rounds"] == 15 and len(row["times_ms"]) == len(row["reference_ms"]) == 15
               for row in result["models"])
    lines = out.splitlines()
    assert lines[0].split() == ["model", "form", "median", "ms", "speed-up", "noise"]
    assert "(reference)" in lines[1] and "0.50x" in lines[2] and f"results in {out_file}" in out


def test_onnx_and_torch_side_by_side_really_timed(capsys, shipped):
    if "onnx" not in shipped:
        pytest.skip("onnxruntime is not installed")
    code, out, err = _run(capsys, "--model", shipped["onnx"], "--reference", shipped["encoder"], "--rounds", "5",
                          "--warmup", "1", "--clock", "cpu", *SEQ)
    assert code == 0, err
    table = out.splitlines()
    assert "torch (reference)" in table[1] and " onnxruntime " in table[2]
    assert float(table[2].split()[-2].rstrip("x")) > 0


def test_the_form_and_vocabulary_are_read_from_the_graph(shipped):
    if "onnx" not in shipped:
        pytest.skip("onnxruntime is not installed")
    for form in ("onnxruntime", "onnxruntime-opt", "onnxruntime-int8", "onnxruntime-opt-int8"):
        model = compare.locate(str(shipped[form.replace("onnxruntime", "onnx")]), "--model")
        assert (model.kind, model.form, model.vocab_size) == ("onnx", form, 99)


def _bad_cases(tmp_path, shipped):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not a model\n")
    (tmp_path / "garbage.onnx").write_bytes(b"\x00\xff not a graph" * 20)
    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "config.json").write_text(json.dumps({"model_type": "mystery", "auto_map": {"AutoModel": "m.Model"}}))
    (custom / "m.py").write_text("raise SystemExit('code was run')\n")
    encoder = shipped["encoder"]
    return {
        "missing": (["--model", tmp_path / "nope", "--reference", encoder], "no such file or folder"),
        "folder without config": (["--model", tmp_path / "empty", "--reference", encoder], "no config.json"),
        "not a model": (["--model", tmp_path / "notes.txt", "--reference", encoder], "not a model"),
        "bad graph": (["--model", tmp_path / "garbage.onnx", "--reference", encoder], "cannot load"),
        "custom code": (["--model", custom, "--reference", encoder], "--trust-remote-code"),
        "unknown builtin": (["--model", "builtin:nope", "--reference", encoder], "unknown built-in model"),
        "too long": (["--model", encoder, "--reference", encoder, "--seq-len", "64"], "at most 40 tokens"),
        "cpu clock, 2 threads": (["--model", encoder, "--reference", encoder, "--clock", "cpu", "--threads", "2"],
                                 "--threads 1"),
        "few rounds": (["--model", encoder, "--reference", encoder, "--rounds", "2"], "--rounds must be at least 5"),
    }


@pytest.mark.parametrize("case", ["missing", "folder without config", "not a model", "bad graph", "custom code",
                                  "unknown builtin", "too long", "cpu clock, 2 threads", "few rounds"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(capsys, tmp_path, shipped, case):
    if case == "bad graph" and "onnx" not in shipped:
        pytest.skip("onnxruntime is not installed")
    argv, fragment = _bad_cases(tmp_path, shipped)[case]
    out_file = tmp_path / "out.json"
    code, _, err = _run(capsys, *argv, "--out", out_file, *([] if "--seq-len" in argv else SEQ))
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autotinybert latency compare: error:"), err
    assert fragment in err and "Traceback" not in err
    assert not out_file.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_an_onnx_model_without_onnxruntime_is_a_user_error(capsys, tmp_path, shipped, monkeypatch):
    graph = shipped.get("onnx") or tmp_path / "model.onnx"
    graph.touch()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    code, _, err = _run(capsys, "--model", graph, "--reference", shipped["encoder"], *SEQ)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "pip install 'autotinybert[onnx]'" in err


def test_an_existing_out_needs_overwrite(capsys, tmp_path, shipped):
    out_file = tmp_path / "out.json"
    out_file.write_text("{}")
    code, _, err = _run(capsys, "--model", shipped["encoder"], "--reference", shipped["encoder"], "--out", out_file,
                        *SEQ)
    assert code == 2 and "--overwrite" in err and out_file.read_text() == "{}"
