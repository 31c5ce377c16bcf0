"""The command line: working stages, and one-line errors with nothing half-written."""

import argparse
import json
import subprocess
import sys

import pytest
from transformers import AutoModelForMaskedLM

from autotinybert.cli import build_parser, main
from autotinybert.checkpoint import save_supernet
from conftest import TINY_KD, tiny_supernet


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _assert_user_error(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autotinybert "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


@pytest.fixture
def supernet_dir(tmp_path):
    path = tmp_path / "superplm"
    save_supernet(tiny_supernet(TINY_KD), path)
    return path


def _command_words(parser, words=()):
    """Every command and sub-command of ``parser``, walked from argparse itself (new ones included)."""
    yield list(words)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _command_words(child, (*words, name))


@pytest.mark.parametrize("words", list(_command_words(build_parser())), ids=lambda w: " ".join(w) or "autotinybert")
def test_every_command_prints_its_help(capsys, words):
    # argparse %-formats help text: one stray % in a doc crashed --help with a traceback
    with pytest.raises(SystemExit) as exit_:
        main([*words, "--help"])
    out, err = capsys.readouterr()
    assert exit_.value.code == 0, err
    assert out.strip() and "Traceback" not in err


def test_space_prints_space_size_and_released(capsys):
    code, out, _ = _run(capsys, "space", "--mode", "kd")
    assert code == 0
    assert "47,462,800" in out and "KD-S4" in out and "L4-H256-F480-A12-Q192" in out
    assert " NO " not in out


def test_extract_writes_a_verified_checkpoint(capsys, tmp_path, supernet_dir):
    out_dir = tmp_path / "model"
    code, out, err = _run(capsys, "extract", "--supernet", str(supernet_dir), "--arch", "L2-H25-F29-A4-Q16",
                          "--out", str(out_dir), "--onnx")
    assert code == 0, err
    assert "verified" in out
    results = json.loads((out_dir / "results.json").read_text())
    assert results["model_type"] == "autotinybert"
    assert set(results["max_abs_diff"]) == {"extracted", "reloaded", "isolated", "onnx"}
    assert max(results["max_abs_diff"].values()) < 1e-5
    assert (out_dir / "config.yaml").is_file() and (out_dir / "model.onnx").is_file()
    assert AutoModelForMaskedLM.from_pretrained(out_dir, trust_remote_code=True).config.qkv_size == 16
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_extract_saves_the_tokenizer(capsys, tmp_path, minilm_dir):
    sup = tmp_path / "sup"
    space = tmp_path / "space.json"
    space.write_text(json.dumps(TINY_KD.to_dict()))
    assert main(["init", "--space", str(space), "--tokenizer", str(minilm_dir), "--out", str(sup)]) == 0
    assert main(["extract", "--supernet", str(sup), "--arch", "L1-H13-F13-A4-Q8", "--out", str(tmp_path / "m"),
                 "--no-verify"]) == 0
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert len(tokenizer) == 30522 and tokenizer("hello world")["input_ids"][0] == tokenizer.cls_token_id


@pytest.mark.parametrize("arch, fragment", [
    ("L9-H25-F29-A4-Q16", "outside 1..3"),
    ("L2-H25-F29-A3-Q16", "not divisible"),
    ("L2-H25", "malformed architecture"),
])
def test_extract_rejects_bad_architectures(capsys, tmp_path, supernet_dir, arch, fragment):
    out_dir = tmp_path / "model"
    code, _, err = _run(capsys, "extract", "--supernet", str(supernet_dir), "--arch", arch, "--out", str(out_dir))
    _assert_user_error(code, err, fragment)
    assert not out_dir.exists()


@pytest.mark.parametrize("damage, fragment", [
    ("missing", "no such folder"),
    ("truncated", "is corrupt"),
    ("vocab", "vocab_size"),
])
def test_extract_rejects_bad_checkpoints(capsys, tmp_path, supernet_dir, damage, fragment):
    if damage == "missing":
        supernet_dir = tmp_path / "nowhere"
    elif damage == "truncated":
        weights = supernet_dir / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        (supernet_dir / "vocab.txt").write_text("\n".join(str(i) for i in range(500)))
    out_dir = tmp_path / "model"
    code, _, err = _run(capsys, "extract", "--supernet", str(supernet_dir), "--arch", "L2-H25-F29-A4-Q16",
                        "--out", str(out_dir))
    _assert_user_error(code, err, fragment)
    assert not out_dir.exists()


def test_existing_output_is_never_clobbered(capsys, tmp_path, supernet_dir):
    out_dir = tmp_path / "model"
    out_dir.mkdir()
    (out_dir / "precious.txt").write_text("keep me")
    args = ["extract", "--supernet", str(supernet_dir), "--arch", "L2-H25-F29-A4-Q16", "--out", str(out_dir),
            "--no-verify"]
    code, _, err = _run(capsys, *args)
    _assert_user_error(code, err, "--overwrite")
    assert (out_dir / "precious.txt").read_text() == "keep me"
    # a failing --overwrite run keeps the old directory too
    code, _, err = _run(capsys, *args[:4], "L2-H25-F29-A3-Q16", *args[5:], "--overwrite")
    _assert_user_error(code, err)
    assert (out_dir / "precious.txt").read_text() == "keep me"
    assert _run(capsys, *args, "--overwrite")[0] == 0
    assert not (out_dir / "precious.txt").exists() and (out_dir / "model.safetensors").is_file()


def test_init_rejects_contradicting_vocabulary(capsys, tmp_path, minilm_dir):
    code, _, err = _run(capsys, "init", "--tokenizer", str(minilm_dir), "--vocab-size", "100",
                        "--out", str(tmp_path / "s"))
    _assert_user_error(code, err, "contradicts")
    code, _, err = _run(capsys, "init", "--out", str(tmp_path / "s"))
    _assert_user_error(code, err, "--vocab-size")
    assert not (tmp_path / "s").exists()


def test_develop_with_a_missing_config_says_so(capsys):
    code, _, err = _run(capsys, "develop", "--config", "x.yaml", "--out", "unused")
    _assert_user_error(code, err, "x.yaml", "demo, task, cpu-small")


def test_the_real_console_script_exits_non_zero_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "autotinybert", "extract", "--supernet", str(tmp_path / "none"),
                             "--arch", "L1-H13-F13-A4-Q8", "--out", str(tmp_path / "o")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "no such folder" in result.stderr


@pytest.mark.parametrize("argv, advice", [
    (["pretrain", "--out", "o", "--corpus", "c"], "rerun the same command with --resume"),
    (["pretrain", "--out", "o", "--corpus", "c", "--resume"], "rerun the same command to continue"),
    (["develop", "--config", "demo", "--out", "o"], "rerun the same command to continue"),
])
def test_ctrl_c_advice_is_what_the_next_command_accepts(capsys, monkeypatch, tmp_path, argv, advice):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c").write_text("a corpus\n")  # paths are checked before anything runs
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("autotinybert.pretrain.pretrain", interrupted)
    monkeypatch.setattr("autotinybert.develop.develop", interrupted)
    code, _, err = _run(capsys, *argv)
    assert code == 130 and advice in err and len(err.strip().splitlines()) == 1, err


def test_a_sigterm_that_a_library_turns_into_another_error_is_still_one_sigterm_line(tmp_path, capsys, monkeypatch):
    """SIGTERM raised inside a library's import can leave a module half-initialised and come out as
    some other exception (seen: transformers' lazy import re-raising it as ModuleNotFoundError): the
    command still ends with the one SIGTERM line and exit 143. Without a SIGTERM the same error stays
    an error (a traceback: it is a bug)."""
    import os
    import signal

    from autotinybert import latency

    def import_interrupted(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except BaseException as err:  # what a library's `except` around an import may do
            raise ModuleNotFoundError("Could not import module 'PreTrainedModel'") from err

    (tmp_path / "p.jsonl").write_text("{}\n")
    argv = ["latency", "fit", "--data", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "pred.json")]
    monkeypatch.setattr(latency, "fit", import_interrupted)
    assert main(argv) == 143
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "stopped by SIGTERM" in err and "Traceback" not in err, err

    def broken(*args, **kwargs):
        raise ModuleNotFoundError("a real bug")

    monkeypatch.setattr(latency, "fit", broken)
    with pytest.raises(ModuleNotFoundError):
        main(argv)
