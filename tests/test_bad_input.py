"""Bad input over every command: one line, exit code 2, nothing touched, nothing left behind.

Each case runs `autotinybert.cli.main` in-process on tiny fixtures and asserts:

* exit code 2 and no traceback;
* exactly one line on stderr, naming the offending option or file;
* every file that existed before (the case's folder and the shared inputs) is byte-identical
  afterwards, and nothing new is left behind (a refused run leaves no `--out`, no
  `config.yaml`, no staging leftovers).

Argument templates: ``{F}`` the shared inputs, ``{T}`` the case's own folder, ``{C}`` a
tokenised-corpus cache outside both (a cache is not an output), ``{MS}`` a feasible latency
target. A case's ``setup(T)`` writes the damaged files it needs into ``{T}``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from autotinybert.cli import main
from conftest import TINY_MLM, tiny_supernet
from develop_fixtures import tiny_config
from tasks_fixtures import glue_layout, save_tiny_model, save_tiny_superplm, squad_files

GARBAGE = bytes(range(256)) * 8 + b"\xff\xfe\x80\x81 not text at all \xc3\x28"
MARKER = "code-was-run.marker"
ARCH = "L1-H12-F13-A1-Q9"


# --- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Valid inputs of every command, made once (seconds)."""
    from autotinybert.latency import LatencySettings, fingerprint, fit, flops
    from autotinybert.space import Arch

    root = tmp_path_factory.mktemp("inputs")
    save_tiny_superplm(root / "sup")
    save_tiny_model(root / "model")
    glue = glue_layout(root)
    squad_files(root)
    (root / "space.json").write_text(json.dumps(TINY_MLM.to_dict()))
    (root / "corpus.txt").write_text("\n\n".join(
        "the cat sat on the mat .\na big dog ran in the city .\nparis is the capital of france ." for _ in range(40)))
    fp = fingerprint(LatencySettings(seq_len=8))
    import random

    rng = random.Random(0)
    archs = sorted({TINY_MLM.sample(rng) for _ in range(30)})

    def record(arch, reference=False):
        ms = 1e-4 * flops(arch, 1, 24) + 0.2 * arch.num_hidden_layers
        return {"arch": str(arch), "latency": {"median_ms": ms}, "fingerprint": fp, "space": TINY_MLM.to_dict(),
                "reference": reference}

    records = [record(Arch(3, 36, 37, 4, 36), True)] + [record(a) for a in archs]
    (root / "profile.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    predictor, _ = fit(records, epochs=100)
    predictor.save(root / "pred.json")
    ms = predictor.predict(Arch(2, 24, 25, 2, 18))
    (root / "dev.yaml").write_text(json.dumps(tiny_config(root / "dev")))
    (root / "afile").write_text("a file, not a folder\n")
    ft = root / "ftrun"
    assert main(["finetune", "--model", str(root / "model"), "--task", "sst2", "--data-dir", str(glue),
                 "--max-steps", "1", "--batch-size", "2", "--max-seq-length", "16", "--no-progress",
                 "--no-test-predictions", "--out", str(ft)]) == 0
    return {"F": str(root), "G": str(glue), "MS": f"{ms:.4f}", "C": str(tmp_path_factory.mktemp("cache"))}


def snapshot(*roots: Path) -> dict[str, str]:
    """Every path under ``roots`` (hidden ones too) with a hash of its bytes ('dir' for folders)."""
    found = {}
    for root in roots:
        for directory, dirs, files in os.walk(root):
            for name in dirs:
                found[os.path.join(directory, name)] = "dir"
            for name in files:
                path = os.path.join(directory, name)
                found[path] = "link" if os.path.islink(path) else hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return found


# --- damaged inputs (written into the case's folder) ---------------------------------------------
def _copy(source: str, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def garbage(name: str) -> Callable:
    def setup(t: Path, v: dict) -> None:
        (t / name).parent.mkdir(parents=True, exist_ok=True)
        (t / name).write_bytes(GARBAGE)
    return setup


def text(name: str, content: str) -> Callable:
    def setup(t: Path, v: dict) -> None:
        (t / name).parent.mkdir(parents=True, exist_ok=True)
        (t / name).write_text(content, encoding="utf-8")
    return setup


def folder(name: str) -> Callable:
    def setup(t: Path, v: dict) -> None:
        (t / name).mkdir(parents=True)
    return setup


def crowded(name: str = "o") -> Callable:
    """An unrelated non-empty folder."""
    def setup(t: Path, v: dict) -> None:
        (t / name).mkdir(parents=True)
        (t / name / "precious.txt").write_text("keep me")
    return setup


def afile(name: str = "afile") -> Callable:
    return text(name, "a file, not a folder\n")


def model_copy(source: str, damage: str) -> Callable:
    """A copy of a checkpoint folder ``{F}/<source>`` as ``{T}/m``, damaged."""
    def setup(t: Path, v: dict) -> None:
        m = _copy(os.path.join(v["F"], source), t / "m")
        weights = m / "model.safetensors"
        if damage == "truncated":
            weights.write_bytes(weights.read_bytes()[:200])
        elif damage == "garbage-weights":
            weights.write_bytes(GARBAGE)
        elif damage == "no-weights":
            weights.unlink()
        elif damage == "pickle":  # a pickle that would create the marker if it were ever unpickled
            weights.unlink()
            (m / "pytorch_model.bin").write_bytes(
                b"cos\nmkdir\n(V" + str(t / MARKER).encode() + b"\ntR.")
        elif damage == "config":
            (m / "config.json").write_text("{oops")
        elif damage == "config-garbage":
            (m / "config.json").write_bytes(GARBAGE)
        elif damage == "no-config":
            (m / "config.json").unlink()
        elif damage == "remote-code":
            remote_code_folder(m, t / MARKER)
        else:
            raise AssertionError(damage)
    return setup


def remote_code_folder(m: Path, marker: Path) -> None:
    """A checkpoint whose config names custom code that writes ``marker`` when imported."""
    config = json.loads((m / "config.json").read_text())
    config.update(model_type="evilbert", architectures=["EvilModel"],
                  auto_map={"AutoConfig": "modeling_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel",
                            "AutoModelForMaskedLM": "modeling_evil.EvilModel",
                            "AutoModelForSequenceClassification": "modeling_evil.EvilModel"})
    (m / "config.json").write_text(json.dumps(config))
    (m / "modeling_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import BertConfig, BertModel\n"
        "class EvilConfig(BertConfig):\n    model_type = 'evilbert'\n"
        "class EvilModel(BertModel):\n    config_class = EvilConfig\n")


def finished_run(t: Path, v: dict) -> None:
    """A develop run whose stages are all done (what a bad rerun must not delete)."""
    run = t / "run"
    stages = {}
    for name in ("data", "pretrain", "latency", "search", "extract", "further_train", "finetune", "report"):
        (run / name).mkdir(parents=True)
        (run / name / "weights.bin").write_bytes(name.encode() * 100)
        stages[name] = {"status": "done", "input_hash": "x", "digest": "y", "outputs": {}, "wall_seconds": 1}
    (run / "manifest.json").write_text(json.dumps({"run_dir": str(run), "stages": stages}))


# --- the cases ---------------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    argv: list[str]
    names: tuple[str, ...]           # what the one line must contain (the option or file)
    setup: Callable | None = None


def drop(argv: list[str], flag: str) -> list[str]:
    """``argv`` without ``flag`` and its value(s)."""
    if flag not in argv:
        return list(argv)
    i = argv.index(flag)
    end = i + 1
    while end < len(argv) and not argv[end].startswith("--"):
        end += 1
    return argv[:i] + argv[end:]


def put(argv: list[str], flag: str, *values: str) -> list[str]:
    """``argv`` with ``flag``'s value(s) replaced, in place (or the flag added at the end)."""
    if flag not in argv:
        return [*argv, flag, *values]
    i = argv.index(flag)
    rest = drop(argv, flag)
    return rest[:i] + [flag, *values] + rest[i:]


SPACE = ["space"]
INIT = ["init", "--space", "{F}/space.json", "--vocab-size", "50", "--out", "{T}/o"]
EXTRACT = ["extract", "--supernet", "{F}/sup", "--arch", ARCH, "--out", "{T}/o", "--no-verify"]
PRETRAIN = ["pretrain", "--corpus", "{F}/corpus.txt", "--tokenizer", "{F}/sup", "--space", "{F}/space.json",
            "--seq-len", "16", "--batch-size", "2", "--max-steps", "1", "--eval-every", "1", "--eval-batches", "1",
            "--cache-dir", "{C}", "--out", "{T}/o", "--no-progress"]
PROFILE = ["latency", "profile", "--space", "{F}/space.json", "--samples", "2", "--seq-len", "8", "--repeats", "1",
           "--warmup", "0", "--out", "{T}/p.jsonl", "--no-progress"]
FIT = ["latency", "fit", "--data", "{F}/profile.jsonl", "--epochs", "5", "--out", "{T}/pred.json"]
PREDICT = ["latency", "predict", "--predictor", "{F}/pred.json", "--arch", ARCH]
CHECK = ["latency", "check", "--predictor", "{F}/pred.json", "--arch", ARCH, "--repeats", "1", "--warmup", "0"]
_PROXY = ["--valid-corpus", "{F}/corpus.txt", "--cache-dir", "{C}", "--seq-len", "16", "--eval-batch-size", "2",
          "--eval-batches", "1", "--no-progress"]
SEARCH = ["search", "--supernet", "{F}/sup", "--predictor", "{F}/pred.json", "--target-ms", "{MS}", "--method",
          "random", "--generations", "1", "--generation-size", "2", "--grid-step-hidden", "4", "--grid-step-ffn",
          "4", "--window", "0.5", "2", "--out", "{T}/o", "--no-plot", *_PROXY]
CORRELATE = ["search", "correlate", "--supernet", "{F}/sup", "--samples", "3", "--task", "sst2", "--data-dir", "{G}",
             "--ft-max-steps", "1", "--ft-batch-size", "2", "--ft-max-seq-length", "16", "--grid-step-hidden", "4",
             "--grid-step-ffn", "4", "--out", "{T}/o", *_PROXY]
FINETUNE = ["finetune", "--model", "{F}/model", "--task", "sst2", "--data-dir", "{G}", "--max-steps", "1",
            "--batch-size", "2", "--max-seq-length", "16", "--no-progress", "--out", "{T}/o"]
EVALUATE = ["evaluate", "--model", "{F}/ftrun", "--task", "sst2", "--data-dir", "{G}", "--max-seq-length", "16",
            "--no-progress", "--out", "{T}/o"]
DEVELOP = ["develop", "--config", "{F}/dev.yaml", "--out", "{T}/run"]
DEMO = ["demo", "--out", "{T}/run"]
REPORT = ["report", "{T}/run"]
BAD_GLUE = "{T}/g"


def bad_tsv(t: Path, v: dict) -> None:
    _copy(v["G"], t / "g")
    (t / "g" / "SST-2" / "train.tsv").write_bytes(GARBAGE)


def bad_dev_tsv(t: Path, v: dict) -> None:
    _copy(v["G"], t / "g")
    (t / "g" / "SST-2" / "dev.tsv").write_bytes(b"sentence\tlabel\n" + GARBAGE)


CASES: list[Case] = [
    # --- space ---
    Case("space-vocab-negative", SPACE + ["--vocab-size", "-5"], ("--vocab-size",)),
    Case("space-vocab-zero", SPACE + ["--vocab-size", "0"], ("--vocab-size",)),
    Case("space-vocab-not-a-number", SPACE + ["--vocab-size", "many"], ("--vocab-size",)),
    Case("space-mode-unknown", SPACE + ["--mode", "big"], ("--mode",)),
    Case("space-file-missing", SPACE + ["--space", "{T}/nope.yaml"], ("nope.yaml",)),
    Case("space-file-is-a-folder", SPACE + ["--space", "{T}/d"], ("--space",), folder("d")),
    Case("space-file-binary", SPACE + ["--space", "{T}/s.yaml"], ("s.yaml",), garbage("s.yaml")),
    Case("space-file-bad-yaml", SPACE + ["--space", "{T}/s.yaml"], ("s.yaml",), text("s.yaml", "mode: [mlm\n")),
    Case("space-file-a-list", SPACE + ["--space", "{T}/s.yaml"], ("s.yaml",), text("s.yaml", "- 1\n- 2\n")),
    Case("space-file-bad-range", SPACE + ["--space", "{T}/s.yaml"], ("s.yaml",),
         text("s.yaml", "mode: mlm\nlayers: {min: 4, max: 1}\nhidden: {min: 128, max: 256}\nffn: {min: 128, max: 512}\n"
                        "heads: {min: 1, max: 4}\nhead_size: 64\n")),
    Case("space-unknown-flag", SPACE + ["--turbo"], ("--turbo",)),
    # --- init ---
    Case("init-teacher-hidden-zero", INIT + ["--teacher-hidden-size", "0"], ("--teacher-hidden-size",)),
    Case("init-vocab-zero", put(INIT, "--vocab-size", "0"), ("--vocab-size",)),
    Case("init-no-vocabulary", drop(INIT, "--vocab-size"), ("--vocab-size",)),
    Case("init-tokenizer-missing", drop(INIT, "--vocab-size") + ["--tokenizer", "{T}/nope"], ("nope",)),
    Case("init-tokenizer-is-a-file", drop(INIT, "--vocab-size") + ["--tokenizer", "{T}/afile"], ("afile",), afile()),
    Case("init-tokenizer-empty-folder", drop(INIT, "--vocab-size") + ["--tokenizer", "{T}/d"], ("--tokenizer",),
         folder("d")),
    Case("init-tokenizer-binary-vocab", drop(INIT, "--vocab-size") + ["--tokenizer", "{T}/tok"], ("tok",),
         garbage("tok/vocab.txt")),
    Case("init-space-missing", put(INIT, "--space", "{T}/nope.json"), ("nope.json",)),
    Case("init-space-binary", put(INIT, "--space", "{T}/s.json"), ("s.json",), garbage("s.json")),
    Case("init-out-is-a-file", put(INIT, "--out", "{T}/afile"), ("afile",), afile()),
    Case("init-out-crowded", INIT, ("--overwrite",), crowded()),
    Case("init-overwrite-but-bad-space", put(INIT, "--space", "{T}/s.json") + ["--overwrite"], ("s.json",),
         lambda t, v: (crowded()(t, v), garbage("s.json")(t, v))),
    # --- extract ---
    Case("extract-supernet-missing", put(EXTRACT, "--supernet", "{T}/nope"), ("nope",)),
    Case("extract-supernet-is-a-file", put(EXTRACT, "--supernet", "{T}/afile"), ("afile",), afile()),
    Case("extract-supernet-empty-folder", put(EXTRACT, "--supernet", "{T}/d"), ("d",), folder("d")),
    Case("extract-supernet-truncated", put(EXTRACT, "--supernet", "{T}/m"), ("m",), model_copy("sup", "truncated")),
    Case("extract-supernet-garbage-weights", put(EXTRACT, "--supernet", "{T}/m"), ("m",),
         model_copy("sup", "garbage-weights")),
    Case("extract-supernet-pickle", put(EXTRACT, "--supernet", "{T}/m"), ("m",), model_copy("sup", "pickle")),
    Case("extract-supernet-bad-config", put(EXTRACT, "--supernet", "{T}/m"), ("config.json",),
         model_copy("sup", "config")),
    Case("extract-supernet-binary-config", put(EXTRACT, "--supernet", "{T}/m"), ("config.json",),
         model_copy("sup", "config-garbage")),
    Case("extract-supernet-is-a-bert", put(EXTRACT, "--supernet", "{F}/model"), ("model",)),
    Case("extract-arch-malformed", put(EXTRACT, "--arch", "L1-H12"), ("L1-H12",)),
    Case("extract-arch-outside", put(EXTRACT, "--arch", "L9-H12-F13-A1-Q9"), ("L9-H12-F13-A1-Q9",)),
    Case("extract-out-is-a-file", put(EXTRACT, "--out", "{T}/afile"), ("afile",), afile()),
    Case("extract-out-crowded", EXTRACT, ("--overwrite",), crowded()),
    # --- pretrain ---
    Case("pretrain-corpus-missing", put(PRETRAIN, "--corpus", "{T}/nope.txt"), ("nope.txt",)),
    Case("pretrain-corpus-binary", put(PRETRAIN, "--corpus", "{T}/c.txt"), ("c.txt",), garbage("c.txt")),
    Case("pretrain-corpus-empty", put(PRETRAIN, "--corpus", "{T}/c.txt"), ("c.txt",), text("c.txt", "")),
    Case("pretrain-corpus-folder-without-text", put(PRETRAIN, "--corpus", "{T}/d"), ("d",), folder("d")),
    Case("pretrain-corpus-folder-with-binary", put(PRETRAIN, "--corpus", "{T}/d"), ("a.txt",), garbage("d/a.txt")),
    Case("pretrain-valid-corpus-missing", PRETRAIN + ["--valid-corpus", "{T}/nope.txt"], ("nope.txt",)),
    Case("pretrain-valid-corpus-binary", PRETRAIN + ["--valid-corpus", "{T}/v.txt"], ("v.txt",), garbage("v.txt")),
    Case("pretrain-seq-len-one", put(PRETRAIN, "--seq-len", "1"), ("--seq-len",)),
    Case("pretrain-batch-size-zero", put(PRETRAIN, "--batch-size", "0"), ("--batch-size",)),
    Case("pretrain-max-steps-zero", put(PRETRAIN, "--max-steps", "0"), ("--max-steps",)),
    Case("pretrain-lr-zero", PRETRAIN + ["--lr", "0"], ("--lr",)),
    Case("pretrain-warmup-one", PRETRAIN + ["--warmup-ratio", "1"], ("--warmup-ratio",)),
    Case("pretrain-max-layers-zero", PRETRAIN + ["--max-layers", "0"], ("--max-layers",)),
    Case("pretrain-sampling-unknown", PRETRAIN + ["--sampling", "greedy"], ("--sampling",)),
    Case("pretrain-objective-kd-without-teacher", PRETRAIN + ["--objective", "kd"], ("--teacher",)),
    Case("pretrain-teacher-missing", PRETRAIN + ["--objective", "kd", "--teacher", "{T}/nope"], ("nope",)),
    Case("pretrain-teacher-is-a-file", PRETRAIN + ["--objective", "kd", "--teacher", "{T}/afile"], ("afile",), afile()),
    Case("pretrain-teacher-truncated", PRETRAIN + ["--objective", "kd", "--teacher", "{T}/m"], ("m",),
         model_copy("model", "truncated")),
    Case("pretrain-teacher-pickle", PRETRAIN + ["--objective", "kd", "--teacher", "{T}/m"], ("m",),
         model_copy("model", "pickle")),
    Case("pretrain-teacher-remote-code", PRETRAIN + ["--objective", "kd", "--teacher", "{T}/m"],
         ("--trust-remote-code",), model_copy("model", "remote-code")),
    Case("pretrain-init-missing", PRETRAIN + ["--init", "{T}/nope"], ("nope",)),
    Case("pretrain-init-truncated", PRETRAIN + ["--init", "{T}/m"], ("m",), model_copy("sup", "truncated")),
    Case("pretrain-init-pickle", PRETRAIN + ["--arch", "L1-H12-F13-A1-Q9", "--init", "{T}/m"], ("m",),
         model_copy("model", "pickle")),
    Case("pretrain-init-bad-config", PRETRAIN + ["--init", "{T}/m"], ("config.json",), model_copy("sup", "config")),
    Case("pretrain-init-remote-code", PRETRAIN + ["--arch", "L1-H12-F13-A1-Q9", "--init", "{T}/m"],
         ("--trust-remote-code",), model_copy("model", "remote-code")),
    Case("pretrain-tokenizer-missing", put(PRETRAIN, "--tokenizer", "{T}/nope"), ("nope",)),
    Case("pretrain-tokenizer-is-a-file", put(PRETRAIN, "--tokenizer", "{T}/afile"), ("afile",), afile()),
    Case("pretrain-tokenizer-binary-vocab", put(PRETRAIN, "--tokenizer", "{T}/tok"), ("tok",), garbage("tok/vocab.txt")),
    Case("pretrain-space-missing", put(PRETRAIN, "--space", "{T}/nope.json"), ("nope.json",)),
    Case("pretrain-arch-malformed", PRETRAIN + ["--arch", "L1"], ("L1",)),
    Case("pretrain-out-is-a-file", put(PRETRAIN, "--out", "{T}/afile"), ("afile",), afile()),
    Case("pretrain-out-crowded", PRETRAIN, ("--overwrite",), crowded()),
    Case("pretrain-resume-on-crowded", PRETRAIN + ["--resume"], ("--out",), crowded()),
    Case("pretrain-cache-dir-is-a-file", put(PRETRAIN, "--cache-dir", "{T}/afile"), ("afile",), afile()),
    Case("pretrain-vocab-size-zero", PRETRAIN + ["--vocab-size", "0"], ("--vocab-size",)),
    # --- latency profile ---
    Case("profile-samples-zero", put(PROFILE, "--samples", "0"), ("--samples",)),
    Case("profile-threads-zero", PROFILE + ["--threads", "0"], ("--threads",)),
    Case("profile-engine-unknown", PROFILE + ["--engine", "tensorrt"], ("--engine",)),
    Case("profile-repeats-zero", put(PROFILE, "--repeats", "0"), ("--repeats",)),
    Case("profile-warmup-negative", put(PROFILE, "--warmup", "-1"), ("--warmup",)),
    Case("profile-seq-len-zero", put(PROFILE, "--seq-len", "0"), ("--seq-len",)),
    Case("profile-cpu-clock-threads", PROFILE + ["--clock", "cpu", "--threads", "2"], ("--clock",)),
    Case("profile-space-missing", put(PROFILE, "--space", "{T}/nope.yaml"), ("nope.yaml",)),
    Case("profile-space-binary", put(PROFILE, "--space", "{T}/s.yaml"), ("s.yaml",), garbage("s.yaml")),
    Case("profile-out-is-a-folder", put(PROFILE, "--out", "{T}/d"), ("d",), crowded("d")),
    Case("profile-out-is-a-folder-overwrite", put(PROFILE, "--out", "{T}/d") + ["--overwrite"], ("d",), crowded("d")),
    Case("profile-out-is-an-empty-folder", put(PROFILE, "--out", "{T}/d"), ("d",), folder("d")),
    Case("profile-out-exists", PROFILE, ("--overwrite",), text("p.jsonl", "{}\n")),
    Case("profile-resume-binary", PROFILE + ["--resume"], ("p.jsonl",), garbage("p.jsonl")),
    Case("profile-out-under-a-file", put(PROFILE, "--out", "{T}/afile/p.jsonl"), ("afile",), afile()),
    # --- latency fit ---
    Case("fit-data-missing", put(FIT, "--data", "{T}/nope.jsonl"), ("nope.jsonl",)),
    Case("fit-data-is-a-folder", put(FIT, "--data", "{T}/d"), ("d",), folder("d")),
    Case("fit-data-binary", put(FIT, "--data", "{T}/p.jsonl"), ("p.jsonl",), garbage("p.jsonl")),
    Case("fit-data-empty", put(FIT, "--data", "{T}/p.jsonl"), ("p.jsonl",), text("p.jsonl", "")),
    Case("fit-data-not-records", put(FIT, "--data", "{T}/p.jsonl"), ("p.jsonl",), text("p.jsonl", "[1, 2]\n{}\n")),
    Case("fit-data-zero-latency", put(FIT, "--data", "{T}/p.jsonl"), ("p.jsonl",),
         lambda t, v: _scaled_profile(t, v, 0.0)),
    Case("fit-data-negative-latency", put(FIT, "--data", "{T}/p.jsonl"), ("p.jsonl",),
         lambda t, v: _scaled_profile(t, v, -1.0)),
    Case("fit-data-nan-latency", put(FIT, "--data", "{T}/p.jsonl"), ("p.jsonl",),
         lambda t, v: _scaled_profile(t, v, float("nan"))),
    Case("fit-data-too-few", put(FIT, "--data", "{T}/p.jsonl"), ("p.jsonl",), lambda t, v: _scaled_profile(t, v, 1, 2)),
    Case("fit-hidden-negative", FIT + ["--hidden", "-8"], ("--hidden",)),
    Case("fit-epochs-zero", put(FIT, "--epochs", "0"), ("--epochs",)),
    Case("fit-holdout-one", FIT + ["--holdout", "1"], ("--holdout",)),
    Case("fit-out-exists", FIT, ("--overwrite",), text("pred.json", "{}")),
    Case("fit-out-is-a-folder", put(FIT, "--out", "{T}/d"), ("d",), folder("d")),
    Case("fit-out-under-a-file", put(FIT, "--out", "{T}/afile/pred.json"), ("afile",), afile()),
    # --- latency predict ---
    Case("predict-predictor-missing", put(PREDICT, "--predictor", "{T}/nope.json"), ("nope.json",)),
    Case("predict-predictor-is-a-folder", put(PREDICT, "--predictor", "{T}/d"), ("d",), folder("d")),
    Case("predict-predictor-binary", put(PREDICT, "--predictor", "{T}/p.json"), ("p.json",), garbage("p.json")),
    Case("predict-predictor-bad-json", put(PREDICT, "--predictor", "{T}/p.json"), ("p.json",), text("p.json", "{oops")),
    Case("predict-predictor-a-profile", put(PREDICT, "--predictor", "{F}/profile.jsonl"), ("profile.jsonl",)),
    Case("predict-arch-malformed", put(PREDICT, "--arch", "L1-H12-F13"), ("L1-H12-F13",)),
    Case("predict-arch-zero-layers", put(PREDICT, "--arch", "L0-H12-F13-A1-Q9"), ("L0-H12-F13-A1-Q9",)),
    Case("predict-arch-missing", drop(PREDICT, "--arch"), ("--arch",)),
    Case("predict-space-other", PREDICT + ["--space", "paper-kd"], ("--space",)),
    Case("predict-space-missing", PREDICT + ["--space", "{T}/nope.yaml"], ("nope.yaml",)),
    # --- latency check ---
    Case("check-predictor-missing", put(CHECK, "--predictor", "{T}/nope.json"), ("nope.json",)),
    Case("check-predictor-is-a-folder", put(CHECK, "--predictor", "{T}/d"), ("d",), folder("d")),
    Case("check-predictor-binary", put(CHECK, "--predictor", "{T}/p.json"), ("p.json",), garbage("p.json")),
    Case("check-arch-malformed", put(CHECK, "--arch", "LL"), ("LL",)),
    Case("check-repeats-zero", put(CHECK, "--repeats", "0"), ("--repeats",)),
    Case("check-warmup-negative", put(CHECK, "--warmup", "-2"), ("--warmup",)),
    # --- search ---
    Case("search-supernet-missing", put(SEARCH, "--supernet", "{T}/nope"), ("nope",)),
    Case("search-supernet-is-a-file", put(SEARCH, "--supernet", "{T}/afile"), ("afile",), afile()),
    Case("search-supernet-truncated", put(SEARCH, "--supernet", "{T}/m"), ("m",), model_copy("sup", "truncated")),
    Case("search-supernet-bad-config", put(SEARCH, "--supernet", "{T}/m"), ("config.json",), model_copy("sup", "config")),
    Case("search-predictor-missing", put(SEARCH, "--predictor", "{T}/nope.json"), ("nope.json",)),
    Case("search-predictor-is-a-folder", put(SEARCH, "--predictor", "{T}/d"), ("d",), folder("d")),
    Case("search-predictor-binary", put(SEARCH, "--predictor", "{T}/p.json"), ("p.json",), garbage("p.json")),
    Case("search-out-is-a-file", put(SEARCH, "--out", "{T}/afile"), ("afile",), afile()),
    Case("search-out-under-a-file", put(SEARCH, "--out", "{T}/afile/o"), ("afile",), afile()),
    Case("search-out-crowded", SEARCH, ("--out",), crowded()),
    Case("search-resume-on-crowded", SEARCH + ["--resume"], ("--resume",), crowded()),
    Case("search-speedup-zero", SEARCH + ["--speedup", "0"], ("--speedup",)),
    Case("search-target-negative", put(SEARCH, "--target-ms", "-1"), ("--target-ms",)),
    Case("search-window-zero", put(SEARCH, "--window", "0", "1"), ("--window",)),
    Case("search-explore-rate-two", SEARCH + ["--explore-rate", "2"], ("--explore-rate",)),
    Case("search-generation-size-zero", put(SEARCH, "--generation-size", "0"), ("--generation-size",)),
    Case("search-valid-corpus-missing", put(SEARCH, "--valid-corpus", "{T}/nope.txt"), ("nope.txt",)),
    Case("search-valid-corpus-binary", put(SEARCH, "--valid-corpus", "{T}/v.txt"), ("v.txt",), garbage("v.txt")),
    Case("search-eval-batch-size-zero", put(SEARCH, "--eval-batch-size", "0"), ("--eval-batch-size",)),
    Case("search-cache-dir-is-a-file", put(SEARCH, "--cache-dir", "{T}/afile"), ("afile",), afile()),
    Case("search-kd-metric-teacher-missing", SEARCH + ["--metric", "kd_loss", "--teacher", "{T}/nope"], ("nope",)),
    Case("search-kd-metric-teacher-remote-code", SEARCH + ["--metric", "kd_loss", "--teacher", "{T}/m"],
         ("--trust-remote-code",), model_copy("model", "remote-code")),
    Case("search-finetune-unknown-task", SEARCH + ["--evaluator", "finetune", "--task", "imagenet", "--data-dir", "{G}"],
         ("imagenet",)),
    Case("search-finetune-data-dir-missing", SEARCH + ["--evaluator", "finetune", "--task", "sst2", "--data-dir",
                                                       "{T}/nope"], ("nope",)),
    Case("search-finetune-binary-tsv", SEARCH + ["--evaluator", "finetune", "--task", "sst2", "--data-dir", BAD_GLUE,
                                                 "--ft-max-steps", "1"], ("train.tsv",), bad_tsv),
    Case("search-ft-batch-size-zero", SEARCH + ["--ft-batch-size", "0"], ("--ft-batch-size",)),
    # --- search correlate ---
    Case("correlate-supernet-missing", put(CORRELATE, "--supernet", "{T}/nope"), ("nope",)),
    Case("correlate-supernet-truncated", put(CORRELATE, "--supernet", "{T}/m"), ("m",), model_copy("sup", "truncated")),
    Case("correlate-samples-one", put(CORRELATE, "--samples", "1"), ("--samples",)),
    Case("correlate-out-under-a-file", put(CORRELATE, "--out", "{T}/afile/o"), ("afile",), afile()),
    Case("correlate-out-is-a-file", put(CORRELATE, "--out", "{T}/afile"), ("afile",), afile()),
    Case("correlate-out-crowded", CORRELATE, ("--out",), crowded()),
    Case("correlate-unknown-task", put(CORRELATE, "--task", "imagenet"), ("imagenet",)),
    Case("correlate-data-dir-missing", put(CORRELATE, "--data-dir", "{T}/nope"), ("nope",)),
    Case("correlate-binary-tsv", put(CORRELATE, "--data-dir", BAD_GLUE), ("train.tsv",), bad_tsv),
    Case("correlate-predictor-binary", CORRELATE + ["--predictor", "{T}/p.json", "--target-ms", "1"], ("p.json",),
         garbage("p.json")),
    Case("correlate-ft-lr-zero", CORRELATE + ["--ft-lr", "0"], ("--ft-lr",)),
    Case("correlate-valid-corpus-binary", put(CORRELATE, "--valid-corpus", "{T}/v.txt"), ("v.txt",), garbage("v.txt")),
    # --- finetune ---
    Case("finetune-model-missing", put(FINETUNE, "--model", "{T}/nope"), ("--model", "nope")),
    Case("finetune-model-is-a-file", put(FINETUNE, "--model", "{T}/afile"), ("--model", "afile"), afile()),
    Case("finetune-model-empty-folder", put(FINETUNE, "--model", "{T}/d"), ("--model",), folder("d")),
    Case("finetune-model-bad-config", put(FINETUNE, "--model", "{T}/m"), ("config.json",), model_copy("model", "config")),
    Case("finetune-model-binary-config", put(FINETUNE, "--model", "{T}/m"), ("config.json",),
         model_copy("model", "config-garbage")),
    Case("finetune-model-truncated", put(FINETUNE, "--model", "{T}/m"), ("m",), model_copy("model", "truncated")),
    Case("finetune-model-garbage-weights", put(FINETUNE, "--model", "{T}/m"), ("m",),
         model_copy("model", "garbage-weights")),
    Case("finetune-model-no-weights", put(FINETUNE, "--model", "{T}/m"), ("m",), model_copy("model", "no-weights")),
    Case("finetune-model-pickle", put(FINETUNE, "--model", "{T}/m"), ("m",), model_copy("model", "pickle")),
    Case("finetune-model-remote-code", put(FINETUNE, "--model", "{T}/m"), ("--trust-remote-code",),
         model_copy("model", "remote-code")),
    Case("finetune-teacher-missing", FINETUNE + ["--teacher", "{T}/nope"], ("nope",)),
    Case("finetune-teacher-truncated", FINETUNE + ["--teacher", "{T}/m"], ("m",), model_copy("model", "truncated")),
    Case("finetune-teacher-pickle", FINETUNE + ["--teacher", "{T}/m"], ("m",), model_copy("model", "pickle")),
    Case("finetune-teacher-remote-code", FINETUNE + ["--teacher", "{T}/m"], ("--trust-remote-code",),
         model_copy("model", "remote-code")),
    Case("finetune-unknown-task", put(FINETUNE, "--task", "imagenet"), ("imagenet",)),
    Case("finetune-data-dir-missing", put(FINETUNE, "--data-dir", "{T}/nope"), ("nope",)),
    Case("finetune-data-dir-is-a-file", put(FINETUNE, "--data-dir", "{T}/afile"), ("afile",), afile()),
    Case("finetune-binary-tsv", put(FINETUNE, "--data-dir", BAD_GLUE), ("train.tsv",), bad_tsv),
    Case("finetune-binary-dev-tsv", put(FINETUNE, "--data-dir", BAD_GLUE), ("dev.tsv",), bad_dev_tsv),
    Case("finetune-out-is-a-file", put(FINETUNE, "--out", "{T}/afile"), ("afile",), afile()),
    Case("finetune-out-under-a-file", put(FINETUNE, "--out", "{T}/afile/o"), ("afile",), afile()),
    Case("finetune-out-crowded", FINETUNE, ("--overwrite",), crowded()),
    Case("finetune-resume-crowded", FINETUNE + ["--resume"], ("--out",), crowded()),
    Case("finetune-lr-zero", FINETUNE + ["--lr", "0"], ("--lr",)),
    Case("finetune-batch-size-zero", put(FINETUNE, "--batch-size", "0"), ("--batch-size",)),
    Case("finetune-epochs-zero", FINETUNE + ["--epochs", "0"], ("--epochs",)),
    Case("finetune-warmup-one", FINETUNE + ["--warmup-ratio", "1"], ("--warmup-ratio",)),
    Case("finetune-kd-alpha-two", FINETUNE + ["--kd-alpha", "2"], ("--kd-alpha",)),
    Case("finetune-max-seq-length-four", put(FINETUNE, "--max-seq-length", "4"), ("--max-seq-length",)),
    Case("finetune-threads-zero", FINETUNE + ["--threads", "0"], ("--threads",)),
    Case("finetune-tokenizer-missing", FINETUNE + ["--tokenizer", "{T}/nope"], ("nope",)),
    Case("finetune-tokenizer-is-a-file", FINETUNE + ["--tokenizer", "{T}/afile"], ("afile",), afile()),
    Case("finetune-squad-train-file-missing", put(FINETUNE, "--task", "squad") + [
        "--train-file", "{T}/nope.json", "--dev-file", "{F}/squad/dev-v1.1.json"], ("nope.json",)),
    Case("finetune-squad-dev-file-is-a-folder", put(FINETUNE, "--task", "squad") + [
        "--train-file", "{F}/squad/train-v1.1.json", "--dev-file", "{T}/d"], ("d",), folder("d")),
    Case("finetune-squad-train-file-binary", put(FINETUNE, "--task", "squad") + [
        "--train-file", "{T}/t.json", "--dev-file", "{F}/squad/dev-v1.1.json"], ("t.json",), garbage("t.json")),
    Case("finetune-squad-train-file-not-squad", put(FINETUNE, "--task", "squad") + [
        "--train-file", "{T}/t.json", "--dev-file", "{F}/squad/dev-v1.1.json"], ("t.json",), text("t.json", "[1]")),
    # --- evaluate ---
    Case("evaluate-model-missing", put(EVALUATE, "--model", "{T}/nope"), ("nope",)),
    Case("evaluate-model-is-a-file", put(EVALUATE, "--model", "{T}/afile"), ("afile",), afile()),
    Case("evaluate-model-bad-config", put(EVALUATE, "--model", "{T}/m"), ("config.json",),
         model_copy("ftrun/sst2/model", "config")),
    Case("evaluate-model-truncated", put(EVALUATE, "--model", "{T}/m"), ("m",),
         model_copy("ftrun/sst2/model", "truncated")),
    Case("evaluate-model-pickle", put(EVALUATE, "--model", "{T}/m"), ("m",), model_copy("ftrun/sst2/model", "pickle")),
    Case("evaluate-model-remote-code", put(EVALUATE, "--model", "{T}/m"), ("--trust-remote-code",),
         model_copy("ftrun/sst2/model", "remote-code")),
    Case("evaluate-model-not-finetuned", put(EVALUATE, "--model", "{F}/model"), ("model",)),
    Case("evaluate-eval-batch-size-zero", EVALUATE + ["--eval-batch-size", "0"], ("--eval-batch-size",)),
    Case("evaluate-doc-stride-zero", EVALUATE + ["--doc-stride", "0"], ("--doc-stride",)),
    Case("evaluate-max-seq-length-zero", put(EVALUATE, "--max-seq-length", "0"), ("--max-seq-length",)),
    Case("evaluate-unknown-task", put(EVALUATE, "--task", "imagenet"), ("imagenet",)),
    Case("evaluate-data-dir-missing", put(EVALUATE, "--data-dir", "{T}/nope"), ("nope",)),
    Case("evaluate-binary-dev-tsv", put(EVALUATE, "--data-dir", BAD_GLUE), ("dev.tsv",), bad_dev_tsv),
    Case("evaluate-out-is-a-file", put(EVALUATE, "--out", "{T}/afile"), ("afile",), afile()),
    Case("evaluate-out-under-a-file", put(EVALUATE, "--out", "{T}/afile/o"), ("afile",), afile()),
    Case("evaluate-out-crowded", EVALUATE, ("--overwrite",), crowded()),
    Case("evaluate-table-missing", ["evaluate", "--table", "{T}/nope"], ("nope",)),
    Case("evaluate-table-binary", ["evaluate", "--table", "{T}/r/results.json"], ("results.json",),
         garbage("r/results.json")),
    Case("evaluate-table-with-model", ["evaluate", "--table", "{F}/ftrun", "--model", "{F}/ftrun"], ("--table",)),
    Case("evaluate-without-model", ["evaluate", "--task", "sst2"], ("--model",)),
    # --- develop ---
    Case("develop-config-missing", put(DEVELOP, "--config", "{T}/nope.yaml"), ("nope.yaml",)),
    Case("develop-config-is-a-folder", put(DEVELOP, "--config", "{T}/d"), ("d",), folder("d")),
    Case("develop-config-binary", put(DEVELOP, "--config", "{T}/c.yaml"), ("c.yaml",), garbage("c.yaml")),
    Case("develop-config-bad-yaml", put(DEVELOP, "--config", "{T}/c.yaml"), ("c.yaml",), text("c.yaml", "run: [1\n")),
    Case("develop-set-without-equals", DEVELOP + ["--set", "pretrain.max_steps"], ("--set",)),
    Case("develop-set-bad-yaml", DEVELOP + ["--set", "finetune.tasks=[sst2"], ("--set",)),
    Case("develop-set-negative-steps", DEVELOP + ["--set", "pretrain.max_steps=-1"], ("pretrain.max_steps",)),
    Case("develop-set-unknown-task", DEVELOP + ["--set", "finetune.tasks=[imagenet]"], ("imagenet",)),
    Case("develop-set-unknown-section", DEVELOP + ["--set", "deploy.x=1"], ("deploy",)),
    Case("develop-set-unknown-key", DEVELOP + ["--set", "pretrain.speed=1"], ("pretrain.speed",)),
    Case("develop-set-threads-zero", DEVELOP + ["--set", "run.threads=0"], ("run.threads",)),
    Case("develop-set-method-unknown", DEVELOP + ["--set", "search.method=genetic"], ("search.method",)),
    Case("develop-corpus-missing", DEVELOP + ["--set", "data.corpus=[{T}/nope.txt]"], ("nope.txt",)),
    Case("develop-tasks-dir-missing", DEVELOP + ["--set", "data.tasks_dir={T}/nope"], ("nope",)),
    Case("develop-pretrain-reuse-missing", DEVELOP + ["--set", "pretrain.reuse={T}/nope"], ("nope",)),
    Case("develop-latency-reuse-missing", DEVELOP + ["--set", "latency.reuse={T}/nope.json"], ("nope.json",)),
    Case("develop-teacher-missing", DEVELOP + ["--set", "pretrain.objective=kd", "--set", "pretrain.teacher={T}/nope"],
         ("nope",)),
    Case("develop-space-missing", DEVELOP + ["--set", "pretrain.space={T}/nope.yaml"], ("nope.yaml",)),
    Case("develop-out-is-a-file", put(DEVELOP, "--out", "{T}/afile"), ("afile",), afile()),
    Case("develop-out-under-a-file", put(DEVELOP, "--out", "{T}/afile/run"), ("afile",), afile()),
    Case("develop-out-crowded", DEVELOP, ("--out",), crowded("run")),
    Case("develop-overwrite-crowded", DEVELOP + ["--overwrite"], ("--overwrite",), crowded("run")),
    Case("develop-finished-run-bad-steps", DEVELOP + ["--set", "pretrain.max_steps=-1"], ("pretrain.max_steps",),
         finished_run),
    Case("develop-finished-run-unknown-task", DEVELOP + ["--set", "finetune.tasks=[imagenet]"], ("imagenet",),
         finished_run),
    Case("develop-finished-run-missing-corpus", DEVELOP + ["--set", "data.corpus=[{T}/nope.txt]"], ("nope.txt",),
         finished_run),
    Case("develop-finished-run-overwrite-bad-set", DEVELOP + ["--overwrite", "--set", "search.window=[2, 1]"],
         ("search.window",), finished_run),
    # --- demo ---
    Case("demo-set-steps-zero", DEMO + ["--set", "pretrain.max_steps=0"], ("pretrain.max_steps",)),
    Case("demo-set-without-dot", DEMO + ["--set", "nodot=1"], ("--set",)),
    Case("demo-set-bad-yaml", DEMO + ["--set", "pretrain.lr=[1"], ("--set",)),
    Case("demo-set-unknown-task", DEMO + ["--set", "finetune.tasks=[imagenet]"], ("imagenet",)),
    Case("demo-set-unknown-section", DEMO + ["--set", "deploy.x=1"], ("deploy",)),
    Case("demo-set-threads-negative", DEMO + ["--set", "run.threads=-1"], ("run.threads",)),
    Case("demo-set-corpus-missing", DEMO + ["--set", "data.corpus=[{T}/nope.txt]"], ("nope.txt",)),
    Case("demo-out-is-a-file", put(DEMO, "--out", "{T}/afile"), ("afile",), afile()),
    Case("demo-out-under-a-file", put(DEMO, "--out", "{T}/afile/run"), ("afile",), afile()),
    Case("demo-out-crowded", DEMO, ("--out",), crowded("run")),
    Case("demo-overwrite-crowded", DEMO + ["--overwrite"], ("--overwrite",), crowded("run")),
    Case("demo-finished-run-bad-set", DEMO + ["--set", "pretrain.max_steps=-1"], ("pretrain.max_steps",), finished_run),
    # --- report ---
    Case("report-run-missing", ["report", "{T}/nope"], ("nope",)),
    Case("report-run-is-a-file", ["report", "{T}/afile"], ("afile",), afile()),
    Case("report-run-empty", REPORT, ("run",), folder("run")),
    Case("report-run-crowded", REPORT, ("run",), crowded("run")),
    Case("report-manifest-bad-json", REPORT, ("manifest.json",), text("run/manifest.json", "{oops")),
    Case("report-manifest-binary", REPORT, ("manifest.json",), garbage("run/manifest.json")),
    Case("report-manifest-a-list", REPORT, ("manifest.json",), text("run/manifest.json", "[]")),
    Case("report-run-unfinished", REPORT, ("run",), text("run/manifest.json", '{"stages": {}}')),
    Case("report-out-is-a-file", REPORT + ["--out", "{T}/afile"], ("afile",), lambda t, v: (afile()(t, v), finished_run(t, v))),
    Case("report-out-crowded", REPORT + ["--out", "{T}/o"], ("--out",), lambda t, v: (crowded()(t, v), finished_run(t, v))),
    # --- usage ---
    Case("no-command", [], ("COMMAND",)),
    Case("unknown-command", ["deploy"], ("deploy",)),
    Case("latency-without-stage", ["latency"], ("STAGE",)),
]


def _scaled_profile(t: Path, v: dict, latency: float, keep: int | None = None) -> None:
    lines = Path(v["F"], "profile.jsonl").read_text().splitlines()[:keep]
    records = [json.loads(line) for line in lines]
    for i, record in enumerate(records):
        if i % 3 == 1:
            record["latency"]["median_ms"] = latency if latency != 1 else record["latency"]["median_ms"]
    (t / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _format(argv: list[str], values: dict) -> list[str]:
    return [a.format(**values) for a in argv]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path.parent / "home"))  # no cache written under the case's folder
    values = {**inputs, "T": str(tmp_path)}
    if case.setup:
        case.setup(tmp_path, values)
    before = snapshot(tmp_path, Path(inputs["F"]))
    try:
        code = main(_format(case.argv, values))
    except SystemExit as exit:  # argparse usage errors
        code = exit.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("autotinybert"), err
    for name in case.names:
        assert _format([name], values)[0] in lines[0], (name, lines[0])
    after = snapshot(tmp_path, Path(inputs["F"]))
    assert not (tmp_path / MARKER).exists(), "code from the checkpoint folder ran"
    assert {p: h for p, h in after.items() if before.get(p) != h} == {}, "files changed or left behind"
    assert set(before) == set(after), "files removed"


def test_the_battery_covers_every_command():
    first = {tuple(c.argv[:2]) if c.argv[:1] in (["latency"], ["search"]) and len(c.argv) > 1
             and not c.argv[1].startswith("--") else tuple(c.argv[:1]) for c in CASES}
    commands = {("space",), ("init",), ("pretrain",), ("extract",), ("latency", "profile"), ("latency", "fit"),
                ("latency", "predict"), ("latency", "check"), ("search",), ("search", "correlate"), ("finetune",),
                ("evaluate",), ("develop",), ("demo",), ("report",)}
    assert commands <= first
    assert len(CASES) >= 150


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def _refused(case_id: str, inputs: dict, root: Path, capsys) -> str:
    """Run one battery case in ``root`` with the battery's checks; returns its line."""
    case = next(c for c in CASES if c.id == case_id)
    root.mkdir(parents=True, exist_ok=True)
    values = {**inputs, "T": str(root)}
    if case.setup:
        case.setup(root, values)
    before = snapshot(root, Path(inputs["F"]))
    code, _, err = _run(_format(case.argv, values), capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(root, Path(inputs["F"])) == before and not (root / MARKER).exists()
    return err.strip()


# --- unicode and spaces in every command's paths ----------------------------------------------------
@pytest.fixture(scope="module")
def odd(inputs, tmp_path_factory):
    """The inputs again, under a folder whose name has spaces and non-ASCII letters."""
    root = tmp_path_factory.mktemp("odd") / "données d'entrée ü 名"
    shutil.copytree(inputs["F"], root)
    return {**inputs, "F": str(root), "G": str(root / "glue_data")}


def _ok(argv: list[str], values: dict, capsys) -> str:
    code, out, err = _run(_format(argv, values), capsys)
    assert code == 0, err
    return out


def _work(tmp_path: Path) -> Path:
    work = tmp_path / "sortie à l'écran ß"
    work.mkdir()
    return work


@pytest.mark.parametrize("name, argv, made", [
    ("space", SPACE + ["--space", "{F}/space.json"], None),
    ("init", INIT, "o/model.safetensors"),
    ("extract", EXTRACT, "o/config.json"),
    ("pretrain", PRETRAIN, "o/results.json"),
    ("latency profile", PROFILE, "p.jsonl"),
    ("latency fit", FIT, "pred.json"),
    ("latency predict", PREDICT, None),
    ("latency check", CHECK, None),
    ("search", SEARCH, "o/best.json"),
    ("search correlate", CORRELATE, "o/correlate.json"),
    ("finetune", FINETUNE, "o/results.json"),
    ("evaluate", EVALUATE, "o/results.json"),
])
def test_unicode_and_space_paths_work(name, argv, made, odd, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    work = _work(tmp_path)
    _ok(argv, {**odd, "T": str(work)}, capsys)
    if made:
        assert (work / made).is_file()


def _quick_config(values: dict) -> dict:
    """The tiny develop config, reusing the inputs' SuperPLM and predictor (seconds, not minutes)."""
    config = json.loads(Path(values["F"], "dev.yaml").read_text())
    config["data"]["cache_dir"] = values["C"]
    config["pretrain"]["reuse"] = str(Path(values["F"], "sup"))
    config["latency"]["reuse"] = str(Path(values["F"], "pred.json"))
    config["further_train"]["max_steps"] = 0
    return config


def test_unicode_and_space_paths_work_for_develop_and_report(odd, tmp_path, capsys):
    values = {**odd, "T": str(_work(tmp_path))}
    config = _quick_config(values)
    Path(values["T"], "dev é.yaml").write_text(json.dumps(config))
    _ok(["develop", "--config", "{T}/dev é.yaml", "--out", "{T}/run ü"], values, capsys)
    run = Path(values["T"], "run ü")
    assert (run / "results.json").is_file()
    _ok(["report", "{T}/run ü", "--out", "{T}/rapport ñ"], values, capsys)
    assert (Path(values["T"], "rapport ñ") / "index.html").is_file()


def test_unicode_and_space_paths_work_for_demo(odd, tmp_path, capsys):
    """The demo on the tiny fixture data (every key of the tiny config as a --set), in an odd folder."""
    values = {**odd, "T": str(_work(tmp_path))}
    config = _quick_config(values)
    sets = [f"{section}.{key}={json.dumps(value)}" for section, keys in config.items() for key, value in keys.items()]
    sets.append("search.speedups=[]")
    # The demo's task route off: the tiny random-start run is what reuses the inputs' SuperPLM (seconds).
    sets += ["task.enabled=false", "pretrain.init_from=null", "search.evaluator=proxy", "search.rerank=0",
             "search.source_speedups=[]", "finetune.validation_examples=null"]
    _ok(["demo", "--out", "{T}/démo run"] + [a for s in sets for a in ("--set", s)], values, capsys)
    assert (Path(values["T"], "démo run") / "report" / "index.html").is_file()


# --- the nine kinds of the issue, one named test each -------------------------------------------------
def test_kind_1_what_raised_a_traceback_is_one_line(inputs, tmp_path, capsys):
    for i, case_id in enumerate(("finetune-out-under-a-file", "develop-out-under-a-file", "finetune-model-truncated",
                                 "evaluate-model-pickle", "pretrain-init-pickle", "finetune-teacher-truncated",
                                 "pretrain-corpus-binary", "finetune-binary-tsv", "fit-hidden-negative",
                                 "evaluate-eval-batch-size-zero", "develop-set-bad-yaml",
                                 "profile-out-is-a-folder-overwrite")):
        line = _refused(case_id, inputs, tmp_path / str(i), capsys)
        assert line.startswith("autotinybert ") and ": error: " in line


def test_kind_2_bad_values_are_refused_not_accepted(inputs, tmp_path, capsys):
    assert "--vocab-size must be at least 1" in _refused("space-vocab-negative", inputs, tmp_path / "a", capsys)
    assert "--teacher-hidden-size" in _refused("init-teacher-hidden-zero", inputs, tmp_path / "b", capsys)
    assert "--epochs must be at least 1" in _refused("fit-epochs-zero", inputs, tmp_path / "c", capsys)
    for i, case_id in enumerate(("fit-data-zero-latency", "fit-data-negative-latency", "fit-data-nan-latency")):
        assert "latencies must be positive numbers" in _refused(case_id, inputs, tmp_path / f"d{i}", capsys)


def test_kind_3_existing_outputs_are_kept_unless_overwrite(inputs, tmp_path, capsys):
    for i, case_id in enumerate(("pretrain-out-crowded", "fit-out-exists", "report-out-crowded", "init-out-crowded")):
        assert "--overwrite" in _refused(case_id, inputs, tmp_path / str(i), capsys)
    # --overwrite exists on pretrain and latency fit, and replaces only what a finished run produced
    root = tmp_path / "ok"
    values = {**inputs, "T": str(root)}
    crowded()(root, values)
    _ok(PRETRAIN + ["--overwrite"], values, capsys)
    assert (root / "o" / "results.json").is_file() and not (root / "o" / "precious.txt").exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".")]
    (root / "pred.json").write_text("{}")
    _ok(FIT + ["--overwrite"], values, capsys)
    assert "weight" in (root / "pred.json").read_text()


def test_kind_3_an_interrupted_pretrain_overwrite_keeps_the_old_folder(inputs, tmp_path, capsys, monkeypatch):
    root = tmp_path / "x"
    values = {**inputs, "T": str(root)}
    crowded()(root, values)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("autotinybert.pretrain._after_step", interrupt)
    code, _, err = _run(_format(PRETRAIN + ["--overwrite"], values), capsys)
    assert code == 130 and "--resume" in err
    assert (root / "o" / "precious.txt").read_text() == "keep me"
    monkeypatch.undo()
    _ok(PRETRAIN + ["--resume"], values, capsys)  # the advice: the replacement continues and is swapped in
    assert (root / "o" / "results.json").is_file() and not (root / "o" / "precious.txt").exists()


def test_kind_4_develop_validates_everything_before_touching_a_finished_run(inputs, tmp_path, capsys):
    for i, case_id in enumerate(("develop-finished-run-bad-steps", "develop-finished-run-unknown-task",
                                 "develop-finished-run-missing-corpus", "develop-finished-run-overwrite-bad-set",
                                 "demo-finished-run-bad-set")):
        root = tmp_path / str(i)
        _refused(case_id, inputs, root, capsys)
        assert (root / "run" / "pretrain" / "weights.bin").read_bytes() == b"pretrain" * 100


def test_kind_5_a_refused_run_leaves_nothing_so_the_corrected_command_runs(inputs, tmp_path, capsys):
    for i, (case_id, fixed) in enumerate((
            ("finetune-model-truncated", put(FINETUNE, "--model", "{F}/model")),
            ("search-finetune-binary-tsv", put(SEARCH + ["--evaluator", "finetune", "--task", "sst2", "--data-dir",
                                                          BAD_GLUE, "--ft-max-steps", "1"], "--data-dir", "{G}")),
            ("correlate-binary-tsv", CORRELATE))):
        root = tmp_path / str(i)
        _refused(case_id, inputs, root, capsys)
        assert not (root / "o").exists()
        _ok(fixed, {**inputs, "T": str(root)}, capsys)  # the same --out, without --resume


def test_kind_6_a_bad_model_folder_is_named_as_such(inputs, tmp_path, capsys):
    for i, case_id in enumerate(("finetune-model-missing", "finetune-model-is-a-file", "finetune-model-bad-config",
                                 "finetune-model-empty-folder")):
        line = _refused(case_id, inputs, tmp_path / str(i), capsys)
        assert "--model" in line and "tokenizer" not in line, line


def test_kind_7_no_code_from_a_checkpoint_runs_unless_trusted(inputs, tmp_path, capsys):
    for i, case_id in enumerate(("finetune-model-remote-code", "evaluate-model-remote-code",
                                 "finetune-teacher-remote-code", "pretrain-teacher-remote-code",
                                 "pretrain-init-remote-code", "search-kd-metric-teacher-remote-code")):
        assert "--trust-remote-code" in _refused(case_id, inputs, tmp_path / str(i), capsys)
    # with the flag, the folder's code is what runs (the user asked for it)
    from transformers import AutoModel

    from autotinybert.checkpoint import load_pretrained

    evil = _copy(os.path.join(inputs["F"], "model"), tmp_path / "evil")
    remote_code_folder(evil, tmp_path / MARKER)
    assert type(load_pretrained(AutoModel, evil, "--model", trust_remote_code=True)).__name__ == "EvilModel"
    assert (tmp_path / MARKER).exists()


def test_kind_7_our_own_model_type_loads_from_the_package_not_the_folder(tmp_path):
    """An exported autotinybert checkpoint carries modeling files (for machines without the
    package); here they are never imported: the installed classes load it, without trust."""
    from conftest import TINY_KD
    from transformers import AutoModelForMaskedLM

    from autotinybert import extract
    from autotinybert.checkpoint import load_pretrained
    from autotinybert.space import Arch
    from autotinybert.tasks.finetune import load_task_model, resolve_task

    folder = tmp_path / "exported"
    extract(tiny_supernet(TINY_KD), Arch.parse("L2-H25-F29-A4-Q16")).save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "autotinybert"
    for source in folder.glob("*.py"):  # poison the shipped files: importing them leaves a marker
        source.write_text(f"open({str(tmp_path / MARKER)!r}, 'w').write('ran')\n" + source.read_text())
    model = load_pretrained(AutoModelForMaskedLM, folder, "--model")
    assert type(model).__module__ == "autotinybert.hf.modeling_autotinybert"
    load_task_model(folder, resolve_task("sst2"))
    assert not (tmp_path / MARKER).exists()


def test_kind_8_the_advice_after_ctrl_c_is_a_command_that_runs(inputs, tmp_path, capsys, monkeypatch):
    values = {**inputs, "T": str(tmp_path)}

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("autotinybert.evaluators.ProxyEvaluator.__call__", interrupt)
    code, _, err = _run(_format(SEARCH, values), capsys)
    assert code == 130 and "rerun the same command with --resume" in err
    monkeypatch.undo()
    _ok(SEARCH + ["--resume"], values, capsys)
    assert (tmp_path / "o" / "best.json").is_file()
    # a search stopped before it wrote anything continues with --resume too (nothing to resume: it starts)
    _ok(put(SEARCH, "--out", "{T}/fresh") + ["--resume"], values, capsys)


def test_kind_9_a_warning_for_people_is_one_clean_line(inputs, tmp_path, capsys):
    predictor = json.loads(Path(inputs["F"], "pred.json").read_text())
    predictor["fingerprint"]["cpu_model"] = "Some Other CPU 9000"
    (tmp_path / "other.json").write_text(json.dumps(predictor))
    code, out, err = _run(["latency", "predict", "--predictor", str(tmp_path / "other.json"), "--arch", ARCH], capsys)
    assert code == 0 and ARCH in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autotinybert latency predict: warning: latency predictor was "
                                                   "measured on a different device"), err
    assert ".py" not in err and "Warning" not in err and "cpu_model" in err
