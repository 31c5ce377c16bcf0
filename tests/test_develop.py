"""develop: every stage runs; an interrupted stage continues; a changed section reruns it and downstream."""

import json
from pathlib import Path

import pytest

from autotinybert import develop as develop_module
from autotinybert import pretrain as pretrain_module
from autotinybert.cli import main
from autotinybert.develop import STAGES, develop, load_config, validate_config
from autotinybert.develop.config import develop_settings
from autotinybert.develop.stages import space_of
from autotinybert.errors import UserError
from develop_fixtures import tiny_config, write_config


def _attempts(out):
    manifest = json.loads((out / "manifest.json").read_text())
    return {name: entry.get("attempts", 0) for name, entry in manifest["stages"].items()}


def _quiet(_message):
    pass


def test_develop_resumes_an_interrupted_stage_and_reruns_only_what_changed(tmp_path, monkeypatch):
    tiny = tiny_config(tmp_path / "fixtures")
    # The deployed form is int8 (torch dynamic): the predictor, hence the search, optimise int8 latency.
    config = validate_config({**tiny, "latency": {**tiny["latency"], "quantize": "int8"}})
    out = tmp_path / "run"
    real_save = pretrain_module.save_checkpoint

    def save_then_die(out_dir, model, optimizer, scheduler, step, *rest):
        real_save(out_dir, model, optimizer, scheduler, step, *rest)
        if step == 4 and "pretrain" in str(out_dir) and "further" not in str(out_dir):
            raise KeyboardInterrupt  # the process is killed right after the step-4 checkpoint

    monkeypatch.setattr(pretrain_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        develop(config, out, log=_quiet)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["data"]["status"] == "done"
    assert manifest["stages"]["pretrain"]["status"] == "running"
    from autotinybert.report import build_report

    build_report(out, tmp_path / "partial-report")  # a report of an unfinished run works too
    assert "Cost of each stage" in (tmp_path / "partial-report" / "index.html").read_text()
    monkeypatch.setattr(pretrain_module, "save_checkpoint", real_save)

    manifest = develop(config, out, log=_quiet)  # continues: data is not redone, pretrain resumes at step 4
    assert all(manifest["stages"][name]["status"] == "done" for name in STAGES)
    assert _attempts(out) == {name: 2 if name == "pretrain" else 1 for name in STAGES}
    assert json.loads((out / "pretrain" / "results.json").read_text())["resumed_from"] == 4
    models = develop_module.final_models(manifest)
    assert len(models) == 1 and all((tmp_path / p / "config.json").is_file() for p in models.values())
    assert (out / "report" / "index.html").is_file() and (out / "config.yaml").is_file()
    assert json.loads((out / "results.json").read_text())["models"] == models
    assert not list(out.rglob("checkpoint"))  # finished stages drop their optimizer states
    predictor = json.loads((out / "latency" / "predictor.json").read_text())
    assert predictor["fingerprint"]["quantize"] == "int8" and predictor["kind"] in ("mlp", "costs", "flops")
    (model_dir,) = (out / "extract").glob("target-*")
    measured = json.loads((model_dir / "latency.json").read_text())
    # Timed side by side with the reference (the largest) in the searched form and every deployed form.
    assert measured["form"] == "torch-int8" and {"torch", "torch-int8"} <= set(measured["forms"])
    assert measured["speedup"] > 0 and measured["reference_arch"] == str(space_of(develop_settings(config)).largest())
    # signed as documented: negative when the model measured slower than predicted
    assert measured["speedup_error_pct"] == pytest.approx(
        100 * (measured["speedup"] / measured["predicted_speedup"] - 1), abs=0.05)
    verified = json.loads((out / "search" / "verify.json").read_text())
    assert [row["arch"] for row in verified["targets"]] == [measured["arch"]]  # what was verified shipped
    summary = (out / "report" / "summary.md").read_text()
    assert "torch-int8" in summary and "Targets verified before shipping" in summary and "ships as" in summary
    pytest.importorskip("onnxruntime")
    (int8_eval,) = (out / "finetune").glob("target-*/int8-eval/results.json")
    assert json.loads(int8_eval.read_text())["tasks"]["sst2"]["form"] == "onnx-int8"
    assert "(int8 ONNX Runtime)" in summary

    calls = []
    for name, function in list(develop_module._STAGE_FUNCTIONS.items()):
        monkeypatch.setitem(develop_module._STAGE_FUNCTIONS, name,
                            lambda run, d, r, _f=function, _n=name: calls.append(_n) or _f(run, d, r))
    develop(config, out, log=_quiet)
    assert calls == []  # nothing to do

    config["finetune"]["max_steps"] = 4
    develop(config, out, log=_quiet)
    assert calls == ["finetune", "report"]

    calls.clear()
    config["search"]["generation_size"] = 4
    develop(config, out, log=_quiet)
    assert calls == ["search", "extract", "further_train", "finetune", "report"]
    assert _attempts(out)["pretrain"] == 2 and _attempts(out)["latency"] == 1

    calls.clear()
    config["search"].update(evaluator="finetune", ft_max_train_examples=12)  # the paper's fitness, on finetune.tasks
    develop(config, out, log=_quiet)
    assert calls == ["search", "extract", "further_train", "finetune", "report"]
    state = json.loads((out / "search" / "state.json").read_text())
    assert state["evaluator"].startswith("finetune:sst2:") and len(state["evaluations"]) == 4
    assert all(0.0 <= r["fitness"] <= 100.0 for r in state["evaluations"])

    import shutil

    calls.clear()
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)  # a run copied elsewhere continues from its own files
    manifest = develop(config, moved, log=_quiet)
    assert calls == [] and all(p.startswith(str(moved)) for p in develop_module.final_models(manifest).values())


def test_develop_is_deterministic(tmp_path):
    config = validate_config(tiny_config(tmp_path / "fixtures"))
    config["further_train"]["max_steps"] = 0
    config["finetune"]["tasks"] = []
    config["search"]["verify"] = 0  # what ships after side-by-side timing is measured, not seeded
    first = develop(config, tmp_path / "a", log=_quiet)
    config["latency"]["reuse"] = first["stages"]["latency"]["outputs"]["predictor"]  # timing is noise
    second = develop(config, tmp_path / "b", log=_quiet)
    config["latency"]["reuse"] = None
    assert first["stages"]["pretrain"]["digest"] == second["stages"]["pretrain"]["digest"]
    assert first["stages"]["search"]["outputs"]["best"] == second["stages"]["search"]["outputs"]["best"]


def test_shipped_configs_load():
    for name in develop_module.BUILTIN_CONFIGS:
        config = load_config(name, check_paths=False)  # the paper configs name data folders of their own
        assert config["search"]["speedups"] or config["search"]["range_fractions"] or config["search"]["source_speedups"]


@pytest.mark.parametrize("change, fragments", [
    ({"pretrain": {"max_stepz": 3}}, ["unknown option pretrain.max_stepz", "known:"]),
    ({"pretrain": {"max_steps": "many"}}, ["pretrain.max_steps must be an integer"]),
    ({"serch": {}}, ["unknown section 'serch'"]),
    ({"search": {"window": ["low", 1.1]}}, ["search.window must be a number"]),
    ({"search": {"window": [1.2, 1.1]}}, ["LOW <= HIGH"]),
    ({"search": {"range_fractions": [1.5]}}, ["search.range_fractions must be at most 1"]),
    ({"pretrain": {"limits": {"layers": 2}}}, ["pretrain.max_layers"]),
    ({"pretrain": {"objective": "kd"}}, ["pretrain.objective kd needs pretrain.teacher"]),
    ({"finetune": {"lr": 0}}, ["finetune.lr must be greater than 0"]),
    ({"search": {"speedups": [], "range_fractions": [], "target_ms": []}}, ["at least one target"]),
    ({"latency": {"form": "fastest"}}, ["latency.form must be one of configured, auto"]),
    ({"latency": {"form": "auto", "reuse": __file__}}, ["latency.form auto", "drop latency.reuse"]),
])
def test_bad_configs_name_the_key(tmp_path, change, fragments):
    config = tiny_config(tmp_path)
    for section, values in change.items():
        config.setdefault(section, {}).update(values)
    with pytest.raises(UserError) as err:
        validate_config(config)
    assert all(f in str(err.value) for f in fragments), err.value


def _cli(capsys, *argv):
    code = main(list(argv))
    return code, *capsys.readouterr()


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    config = tiny_config(tmp_path)
    config["data"]["corpus"] = [str(tmp_path / "missing")]
    path = write_config(tmp_path, config)
    for argv in (["develop", "--config", str(path), "--out", str(tmp_path / "o")],
                 ["develop", "--config", "nope", "--out", str(tmp_path / "o")],
                 ["develop", "--config", "demo", "--set", "pretrain.lr=fast", "--out", str(tmp_path / "o")],
                 ["demo", "--set", "nodot=1", "--out", str(tmp_path / "o")],
                 ["report", str(tmp_path)],
                 ["develop", "--config", "demo", "--out", str(tmp_path)],  # not empty, not a run: never cleared
                 ["demo", "--overwrite", "--out", str(tmp_path)]):
        code, _, err = _cli(capsys, *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (argv, err)
    assert (tmp_path / "config.yaml").is_file()
    assert "data.corpus" in _cli(capsys, "develop", "--config", str(path), "--out", str(tmp_path / "o"))[2]


@pytest.mark.slow
def test_demo_end_to_end_on_a_smaller_budget(tmp_path, capsys):
    """The README's first command: the task route on the built-in task, on a tiny budget."""
    small = ["finetune.max_steps=2", "finetune.max_train_examples=64", "finetune.validation_examples=16",
             "finetune.max_eval_examples=40", "finetune.eval_batch_size=32", "task.superplm_max_steps=2",
             "task.calibration_examples=16", "latency.samples=7", "latency.repeats=1", "latency.max_repeats=2",
             "latency.warmup=0", "latency.epochs=600", "search.generation_size=2", "search.generations=1",
             "task.superplm_max_train_examples=64", "search.ft_max_train_examples=64",
             "search.rerank=1", "search.ft_max_steps=1", "search.window=[0.5, 1.0]", "extract.latency_repeats=1",
             "extract.onnx=false", "finetune.int8_eval=false",  # the int8 route is covered by test_task_supernet
             f"data.cache_dir={tmp_path / 'cache'}", "run.progress=false"]
    argv = ["demo", "--out", str(tmp_path / "demo")] + [item for s in small for item in ("--set", s)]
    code, out, err = _cli(capsys, *argv)
    assert code == 0, err
    manifest = json.loads((tmp_path / "demo" / "manifest.json").read_text())
    assert all(manifest["stages"][name]["status"] == "done" for name in STAGES)
    assert manifest["config"]["task"]["enabled"]  # the demo is the task route
    models = develop_module.final_models(manifest)
    assert len(models) == 1  # 3x faster than the source
    for path in models.values():
        assert json.loads((Path(path) / "config.json").read_text())["architectures"][0].endswith(
            "ForSequenceClassification")
    assert (tmp_path / "demo" / "report" / "index.html").is_file() and "report:" in out
    assert "AutoModelForSequenceClassification" in out
    finetune = manifest["stages"]["finetune"]["outputs"]["runs"]
    assert set(finetune) == {*models, "source"}
    assert all(json.loads((tmp_path / "demo" / d / "results.json").read_text())["tasks"]["sst2"]["dev_examples"]
               for d in finetune.values())


def test_torchrun_command_line_reproduces_the_settings(tmp_path):
    """Multi-process stages relaunch `autotinybert pretrain`; its arguments must mean the same settings."""
    from dataclasses import asdict

    from autotinybert.cli import build_parser
    from autotinybert.develop import Run, pretrain_arguments
    from autotinybert.develop.stages import _pretrain_settings

    config = validate_config(tiny_config(tmp_path))
    config["pretrain"].update(max_layers=2, max_hidden=32)
    run = Run(tmp_path / "run", config)
    run.outputs["data"] = {"corpus": config["data"]["corpus"], "valid_corpus": config["data"]["valid_corpus"]}
    for settings in (_pretrain_settings(run, tmp_path / "p"),
                     _pretrain_settings(run, tmp_path / "f", further=True, arch="L1-H16-F20-A1-Q8", init=str(tmp_path),
                                        vocab_size=None, max_steps=7)):
        args = build_parser().parse_args(["pretrain", *pretrain_arguments(settings)])
        parsed = {k: getattr(args, k) for k in asdict(settings) if hasattr(args, k)}
        expected = {k: v for k, v in asdict(settings).items() if k in parsed}
        assert parsed == expected
        limits = {dim: getattr(args, f"max_{dim}") for dim in ("layers", "hidden", "ffn", "heads", "qkv")
                  if getattr(args, f"max_{dim}") is not None}
        assert limits == settings.space_limits == {"layers": 2, "hidden": 32}


def test_a_killed_develop_process_continues_where_it_stopped(tmp_path):
    """SIGKILL the real command during pre-training; the same command then finishes the run."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    config = tiny_config(tmp_path / "fixtures")
    config["pretrain"].update(max_steps=300, save_every=5, eval_every=300, log_every=50)
    config["finetune"]["tasks"] = []
    path = write_config(tmp_path, config)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "autotinybert", "develop", "--config", str(path), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(Path(develop_module.__file__).parents[2])}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = out / "pretrain" / "checkpoint" / "trainer_state.json"
    deadline = time.time() + 120
    while not checkpoint.is_file() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoint.is_file(), "pre-training never wrote a checkpoint"
    assert json.loads((out / "manifest.json").read_text())["stages"]["pretrain"]["status"] == "running"

    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "data: done already" in finished.stdout and "pretrain: continuing" in finished.stdout
    assert json.loads((out / "pretrain" / "results.json").read_text())["resumed_from"] > 0
    assert _attempts(out)["data"] == 1
