"""Crash safety of pretrain and finetune: SIGKILL at seeded random instants (some inside
checkpoint/export writes), SIGTERM, and `--resume` until done; the final weights must be
bit-identical to an uninterrupted run. Children come from a fork server (crash_harness.py) so
that 20+ kills fit in seconds; the SIGTERM test of pretrain and the SIGTERM-at-fixed-instants tests
run the real `python -m autotinybert`.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import crash_harness
from conftest import REPO
from tasks_fixtures import glue_layout, save_tiny_model
from test_data import TEXT

KILLS = 20
pytestmark = pytest.mark.slow


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _errors(log: Path) -> str:
    return Path(f"{log}.err").read_text()


def _run(argv: list, log: Path) -> float:
    started = time.perf_counter()
    process = crash_harness.start(argv, log)
    process.join()
    assert process.exitcode == 0, _errors(log)[-3000:]
    return time.perf_counter() - started


def _in_write(out: Path) -> bool:
    """A write is under way: a temporary file/directory, or a checkpoint with two generations."""
    for directory, dirs, files in os.walk(out):
        if any(name.startswith(".") for name in dirs + files):
            return True
        if Path(directory).name == "checkpoint" and len(dirs) > 1:
            return True
    return False


def _check_checkpoints(out: Path) -> None:
    """At any instant every checkpoint's trainer_state.json names a complete generation."""
    for state_file in out.rglob("checkpoint/trainer_state.json"):
        state = json.loads(state_file.read_text())
        generation = state_file.parent / state["generation"]
        load_file(str(generation / "model.safetensors"))
        load_file(str(generation / "optimizer.safetensors"))


def kill_and_resume(argv, root: Path, duration: float, seed: int, weights_of, reference) -> tuple[int, int]:
    """SIGKILL runs at random instants in [0, duration] (every third one as soon as a write is
    seen), rerunning with --resume each time until the run finishes; a run that finishes before
    KILLS kills is checked and a fresh one started. Returns (kills, kills inside a write)."""
    rng = random.Random(seed)
    kills = in_write = sequence = 0
    while kills < KILLS:
        out, sequence = root / f"killed{sequence}", sequence + 1
        resume: list[str] = []
        while True:
            process = crash_harness.start([*argv(out), *resume], root / "killed.log")
            resume = ["--resume"]
            watched = kills % 3 == 2
            deadline = time.perf_counter() + (duration if watched else rng.uniform(0, duration))
            while process.is_alive() and time.perf_counter() < deadline and not (watched and _in_write(out)):
                time.sleep(0.0005 if watched else 0.005)
            if process.is_alive() and kills < KILLS:
                caught = watched and _in_write(out)
                os.kill(process.pid, signal.SIGKILL)
                process.join()
                kills, in_write = kills + 1, in_write + caught
                _check_checkpoints(out)
                continue
            process.join()
            assert process.exitcode == 0, _errors(root / "killed.log")[-3000:]
            break
        assert _same(weights_of(out), reference), f"{out}: weights differ from the uninterrupted run"
    return kills, in_write


# SIGTERM this many seconds after `python -m autotinybert` starts (issue 21): 1 s lands in the
# interpreter's and torch's imports, the later ones in setup, data preparation or the training loop
# (where depends on the machine's load; the test prints where each landed).
SIGTERM_DELAYS = (1, 3, 6, 12)


def _with_options(argv, options: dict):
    """``argv`` with these options' values replaced (or appended)."""
    def changed(out: Path) -> list:
        command = argv(out)
        for flag, value in options.items():
            if flag in command:
                command[command.index(flag) + 1] = value
            else:
                command += [flag, value]
        return command
    return changed


def sigterm_at_instants(argv, root: Path) -> tuple[Path, dict[int, tuple[Path, str]]]:
    """Start ``python -m autotinybert <argv>`` in fresh interpreters, one per delay, all at once, and
    SIGTERM each `SIGTERM_DELAYS` seconds after its own start: each must be alive then, exit 143 and
    print one line naming SIGTERM and --resume. Each is then rerun with --resume (harness children)
    next to an uninterrupted reference run. Returns (the reference's --out, {delay: (--out, line)}).

    The four runs have the two cores to themselves until the one before last is signalled (so that
    the later instants get past the imports); then the reference and the resumes start, keeping the
    cores busy: on an idle 2-core machine the last run gets about 8 s of CPU before its instant.
    """
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    outs = {delay: root / f"sigterm-{delay}s" for delay in SIGTERM_DELAYS}
    runs = {}
    for delay, out in outs.items():
        with open(f"{out}.err", "w") as errors:
            runs[delay] = (subprocess.Popen([sys.executable, "-m", "autotinybert", *map(str, argv(out))], env=env,
                                            stdout=subprocess.DEVNULL, stderr=errors), time.perf_counter())
    children, landed, set_up = [], {}, {}

    def resume(delay: int) -> None:
        process = runs[delay][0]
        assert process.wait(timeout=120) == 143, (process.returncode, Path(f"{outs[delay]}.err").read_text())
        landed[delay] = _sigterm_line(Path(f"{outs[delay]}.err").read_text())
        log = root / f"sigterm-{delay}s-resume.log"
        children.append((crash_harness.start([*argv(outs[delay]), "--resume"], log), log))

    reference = root / "sigterm-reference"
    try:
        for delay in SIGTERM_DELAYS:
            process, started = runs[delay]
            time.sleep(max(0.0, started + delay - time.perf_counter()))
            assert process.poll() is None, \
                f"the run ended (exit {process.returncode}) before its SIGTERM at {delay} s: make it longer"
            set_up[delay] = (outs[delay] / "config.yaml").is_file()  # past imports and argument checks
            process.send_signal(signal.SIGTERM)
            if delay == SIGTERM_DELAYS[-2]:
                children.append((crash_harness.start(argv(reference), root / "sigterm-reference.log"),
                                 root / "sigterm-reference.log"))
                for earlier in SIGTERM_DELAYS[:-2]:
                    resume(earlier)
        for delay in SIGTERM_DELAYS[-2:]:
            resume(delay)
        for child, log in children:
            child.join(timeout=600)
            assert child.exitcode == 0, _errors(log)[-3000:]
    finally:
        for process, _ in runs.values():
            if process.poll() is None:
                process.kill()
                process.wait()
        for child, _ in children:
            if child.is_alive():
                child.kill()
                child.join()
    for delay, line in landed.items():
        print(f"SIGTERM at {delay:>2} s ({'after' if set_up[delay] else 'before'} the run folder was made): {line}")
    return reference, {delay: (outs[delay], landed[delay]) for delay in SIGTERM_DELAYS}


# --- pretrain ---------------------------------------------------------------------------------
def _pretrain_argv(root: Path):
    def argv(out: Path) -> list:
        return ["pretrain", "--corpus", root / "corpus.txt", "--vocab-size", 150, "--space", "paper-mlm",
                "--max-layers", 2, "--max-hidden", 132, "--max-ffn", 132, "--max-heads", 2, "--seq-len", 24,
                "--batch-size", 4, "--max-steps", 30, "--lr", 1e-3, "--save-every", 2, "--eval-every", 30,
                "--eval-batches", 1, "--log-every", 1, "--cache-dir", root / "cache", "--out", out, "--no-progress"]
    return argv


@pytest.fixture(scope="module")
def pretrain_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain-crash")
    (root / "corpus.txt").write_text(TEXT * 30, encoding="utf-8")
    argv = _pretrain_argv(root)
    _run(argv(root / "warm"), root / "warm.log")  # trains the tokenizer and fills the data cache
    duration = _run(argv(root / "reference"), root / "reference.log")
    return root, argv, duration, _weights(root / "reference" / "model.safetensors")


def test_pretrain_survives_sigkill_at_random_instants(pretrain_case):
    root, argv, duration, reference = pretrain_case
    kills, in_write = kill_and_resume(argv, root, duration, seed=0,
                                      weights_of=lambda out: _weights(out / "model.safetensors"), reference=reference)
    print(f"{kills} kills, {in_write} of them inside a write")
    assert kills >= KILLS and in_write >= 1


def test_pretrain_sigterm_saves_and_the_rerun_finishes_identically(pretrain_case):
    root, argv, _, reference = pretrain_case
    out = root / "sigterm"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "autotinybert", *map(str, argv(out))], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    state = out / "checkpoint" / "trainer_state.json"
    deadline = time.time() + 120
    while not state.is_file() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    lines = stderr.strip().splitlines()
    assert process.returncode != 0 and len(lines) == 1, stderr
    assert "stopped by SIGTERM at step" in lines[0] and "--resume" in lines[0] and "Traceback" not in stderr
    step = int(lines[0].split("at step ")[1].split(";")[0])
    assert json.loads(state.read_text())["step"] == step < 30
    _run([*argv(out), "--resume"], root / "sigterm.log")
    assert _same(_weights(out / "model.safetensors"), reference)
    assert json.loads((out / "results.json").read_text())["resumed_from"] == step


def _one_sigterm_line(log: Path) -> str:
    """The child's whole stderr: one line reporting SIGTERM with advice, no traceback."""
    return _sigterm_line(_errors(log))


def _sigterm_line(errors: str) -> str:
    """``errors`` (a whole stderr) is one line reporting SIGTERM with advice, no traceback."""
    lines = errors.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in errors, errors
    assert "stopped by SIGTERM" in lines[0] and "--resume" in lines[0], lines
    return lines[0]


def test_pretrain_sigterm_during_data_preparation_gives_one_line_and_resume_starts_again(pretrain_case):
    """SIGTERM before the training loop (here: while the WordPiece vocabulary is trained into a fresh
    cache) is one line and exit 143, leaves no half-written cache entry under a final name, and
    --resume finishes."""
    root, argv, _, _ = pretrain_case
    out, log, cache = root / "sigterm-early", root / "sigterm-early.log", root / "cache-sigterm-early"

    def early_argv(out: Path) -> list:
        command = argv(out)
        command[command.index("--cache-dir") + 1] = cache
        return command

    process = crash_harness.start(early_argv(out), log)
    deadline = time.time() + 60
    while not cache.exists() and process.is_alive() and time.time() < deadline:
        time.sleep(0.0005)
    os.kill(process.pid, signal.SIGTERM)
    process.join()
    assert process.exitcode == 143, _errors(log)
    _one_sigterm_line(log)
    assert not (out / "checkpoint").exists()
    # The signal can land between a temporary entry's creation and the code that removes it (as a
    # SIGKILL can): what may remain is a temp-named entry the next writer ignores, never a final one.
    hidden = [p for p in cache.rglob("*") if p.name.startswith(".")]
    assert all(p.name.endswith((".partial", ".tmp")) for p in hidden), hidden
    _run([*early_argv(out), "--resume"], root / "sigterm-early-resume.log")
    results = json.loads((out / "results.json").read_text())
    assert results["resumed_from"] == 0 and results["steps"] == 30


def test_pretrain_sigterm_at_1_3_6_12_s_gives_one_line_and_resume_finishes_identically(pretrain_case):
    """Issue 21: SIGTERM 1, 3, 6 and 12 s into a fresh `python -m autotinybert pretrain` (warm data
    cache) is one line and exit 143 each time; --resume then ends with the uninterrupted run's
    weights and steps. The run is the fixture's made longer (more steps, rarer checkpoints): about
    14 s of CPU from a fresh start, so the 12 s run is still going even on an idle machine."""
    root, argv, _, _ = pretrain_case
    longer = _with_options(argv, {"--max-steps": 500, "--eval-every": 500, "--save-every": 50})
    reference, runs = sigterm_at_instants(longer, root)
    expected = json.loads((reference / "results.json").read_text())
    for delay, (out, line) in runs.items():
        assert _same(_weights(out / "model.safetensors"), _weights(reference / "model.safetensors")), delay
        results = json.loads((out / "results.json").read_text())
        assert results["steps"] == expected["steps"] == 500, delay
        if " at step " in line:  # stopped inside the training loop: the rerun starts from its checkpoint
            assert results["resumed_from"] == int(line.split(" at step ")[1].split(";")[0]), (delay, line)


# --- finetune ---------------------------------------------------------------------------------
def _finetune_argv(root: Path):
    def argv(out: Path) -> list:
        return ["finetune", "--model", root / "model", "--task", "sst2", "--data-dir", root / "glue_data",
                "--epochs", 6, "--batch-size", 4, "--max-seq-length", 32, "--lr", 1e-3, "--eval-every", 2,
                "--out", out, "--no-progress", "--threads", 1]
    return argv


@pytest.fixture(scope="module")
def finetune_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune-crash")
    glue_layout(root)
    save_tiny_model(root / "model")
    argv = _finetune_argv(root)
    duration = _run(argv(root / "reference"), root / "reference.log")
    return root, argv, duration, _weights(root / "reference" / "sst2" / "model" / "model.safetensors")


def test_finetune_survives_sigkill_at_random_instants(finetune_case):
    root, argv, duration, reference = finetune_case
    kills, in_write = kill_and_resume(argv, root, duration, seed=1, reference=reference,
                                      weights_of=lambda out: _weights(out / "sst2" / "model" / "model.safetensors"))
    print(f"{kills} kills, {in_write} of them inside a write")
    assert kills >= KILLS and in_write >= 1
    submission = (root / "killed0" / "submission" / "SST-2.tsv").read_text()
    assert submission == (root / "reference" / "submission" / "SST-2.tsv").read_text()


def test_finetune_sigterm_saves_and_the_rerun_finishes_identically(finetune_case):
    root, argv, _, reference = finetune_case
    out, log = root / "sigterm", root / "sigterm.log"
    process = crash_harness.start(argv(out), log)
    state = out / "sst2" / "checkpoint" / "trainer_state.json"
    deadline = time.time() + 60
    while not state.is_file() and process.is_alive() and time.time() < deadline:
        time.sleep(0.002)
    os.kill(process.pid, signal.SIGTERM)
    process.join()
    lines = _errors(log).strip().splitlines()
    assert process.exitcode != 0 and len(lines) == 1 and "stopped by SIGTERM at step" in lines[0], lines
    _run([*argv(out), "--resume"], root / "sigterm-resume.log")
    assert _same(_weights(out / "sst2" / "model" / "model.safetensors"), reference)


def test_finetune_sigterm_before_its_first_checkpoint_gives_one_line_and_resume_finishes_identically(finetune_case):
    """SIGTERM as soon as the run folder is made (the model and data still loading) is one line and
    exit 143; --resume then finishes with the weights of an uninterrupted run."""
    root, argv, _, reference = finetune_case
    out, log = root / "sigterm-early", root / "sigterm-early.log"
    process = crash_harness.start(argv(out), log)
    deadline = time.time() + 60
    while not (out / "config.yaml").is_file() and process.is_alive() and time.time() < deadline:
        time.sleep(0.0005)
    os.kill(process.pid, signal.SIGTERM)
    process.join()
    assert process.exitcode == 143, _errors(log)
    _one_sigterm_line(log)
    _run([*argv(out), "--resume"], root / "sigterm-early-resume.log")
    assert _same(_weights(out / "sst2" / "model" / "model.safetensors"), reference)


def test_finetune_sigterm_at_1_3_6_12_s_gives_one_line_and_resume_finishes_identically(finetune_case):
    """Issue 21: SIGTERM 1, 3, 6 and 12 s into a fresh `python -m autotinybert finetune` is one line
    and exit 143 each time; --resume then ends with the uninterrupted run's weights. The run is the
    fixture's made longer (more steps, rarer evaluations): about 13 s of CPU from a fresh start, so
    the 12 s run is still going even on an idle machine."""
    root, argv, _, _ = finetune_case
    longer = _with_options(argv, {"--max-steps": 600, "--eval-every": 100})
    reference, runs = sigterm_at_instants(longer, root)
    expected = _weights(reference / "sst2" / "model" / "model.safetensors")
    for delay, (out, _) in runs.items():
        assert _same(_weights(out / "sst2" / "model" / "model.safetensors"), expected), delay
