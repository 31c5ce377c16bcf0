"""The shared training toolkit: optimiser groups, schedule, checkpoints, SIGTERM, metrics, and
N processes = 1 process for pre-training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict, replace

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertModel

from autotinybert import training
from autotinybert.errors import Preempted, UserError
from autotinybert.files import recover, staged_directory
from autotinybert.modeling import SuperBertConfig, new_supernet
from autotinybert.pretrain import PretrainSettings, pretrain
from conftest import REPO, TINY_KD
from test_data import TEXT


def _bert():
    config = BertConfig(vocab_size=99, hidden_size=36, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return BertModel(config)


@pytest.mark.parametrize("make", [_bert, lambda: new_supernet(SuperBertConfig.from_space(TINY_KD, vocab_size=99))])
def test_no_weight_decay_for_biases_and_layer_norms_only(make):
    model = make()
    decay, no_decay = training.parameter_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(names[id(p)].endswith("bias") or "LayerNorm" in names[id(p)] for p in no_decay["params"])
    assert all(not names[id(p)].endswith("bias") and "LayerNorm" not in names[id(p)] for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_schedule_rounds_warmup_up_and_decays_to_zero():
    assert training.warmup_steps(0.1, 30) == 3 and training.warmup_steps(0.1, 25) == 3
    assert training.warmup_steps(0.0, 10) == 0 and training.warmup_steps(0.5, 1) == 1
    schedule = training.Schedule(1.0, 10, 0.2)
    assert [round(schedule.lr(s), 4) for s in range(10)] == [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]
    assert training.Schedule(1.0, 4, 0.0).lr(0) == 1.0  # no warm-up: the peak at once


def _trained(seed: int = 0):
    model = _bert()
    optimizer = training.adamw(model, 1e-3, 0.01)
    gen = torch.Generator().manual_seed(seed)
    for step in range(2):
        ids = torch.randint(0, 99, (2, 7), generator=gen)
        model(ids).last_hidden_state.pow(2).mean().backward()  # the pooler stays unused: grad None
        training.clip_and_step(optimizer, model.parameters(), 1.0)
    return model, optimizer


def test_checkpoint_round_trip_is_exact_and_pickle_free(tmp_path):
    model, optimizer = _trained()
    assert model.pooler.dense.weight not in optimizer.state  # unused: AdamW never touched it
    training.save_checkpoint(tmp_path / "ckpt", model, optimizer, {"step": 2, "note": "x"},
                             tensors={"rng": torch.arange(5)})
    training.save_checkpoint(tmp_path / "ckpt", model, optimizer, {"step": 2, "note": "y"})  # same step again
    files = sorted(p.relative_to(tmp_path / "ckpt").as_posix() for p in (tmp_path / "ckpt").rglob("*") if p.is_file())
    assert files == ["step-00000002b/model.safetensors", "step-00000002b/optimizer.safetensors", "trainer_state.json"]
    fresh = _bert()
    fresh_optimizer = training.adamw(fresh, 1e-3, 0.01)
    state, extra = training.load_checkpoint(tmp_path / "ckpt", fresh, fresh_optimizer)
    assert state["step"] == 2 and state["note"] == "y" and extra == {}
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    saved, loaded = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    for index, values in saved["state"].items():
        assert all(torch.equal(values[k], loaded["state"][index][k]) for k in values)


def test_a_killed_save_leaves_the_previous_checkpoint_usable(tmp_path):
    model, optimizer = _trained()
    ckpt = tmp_path / "ckpt"
    training.save_checkpoint(ckpt, model, optimizer, {"step": 2})
    (ckpt / "step-00000004").mkdir()  # a save killed half-way: a generation nobody points at
    (ckpt / "step-00000004" / "model.safetensors").write_bytes(b"torn")
    (ckpt / ".trainer_state.json.abc.tmp").write_text("{")
    state, _ = training.load_checkpoint(ckpt, _bert(), training.adamw(_bert(), 1e-3, 0.01))
    assert state["step"] == 2 and sorted(p.name for p in ckpt.iterdir()) == ["step-00000002", "trainer_state.json"]
    generation = ckpt / "step-00000002" / "optimizer.safetensors"
    generation.write_bytes(generation.read_bytes()[:40])
    with pytest.raises(UserError, match="corrupt"):
        training.load_checkpoint(ckpt, _bert(), training.adamw(_bert(), 1e-3, 0.01))


def test_recover_undoes_a_swap_killed_between_its_renames(tmp_path):
    (tmp_path / ".model.old").mkdir()
    (tmp_path / ".model.old" / "weights").write_text("old")
    (tmp_path / ".model.x1.partial").mkdir()   # the complete new copy, never renamed
    (tmp_path / ".results.json.x2.tmp").write_text("{")
    (tmp_path / ".exported.old").mkdir()        # swap finished, deletion of the old copy lost
    (tmp_path / "exported").mkdir()
    recover(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "model"]
    assert (tmp_path / "model" / "weights").read_text() == "old"
    (tmp_path / ".model.old").mkdir()
    os.replace(tmp_path / "model", tmp_path / ".model.old")
    with staged_directory(tmp_path / "model", overwrite=True) as tmp:  # the next write recovers first
        assert (tmp_path / "model" / "weights").read_text() == "old"
        (tmp / "weights").write_text("new")
    assert (tmp_path / "model" / "weights").read_text() == "new" and not (tmp_path / ".model.old").exists()


def test_sigterm_is_noted_and_the_previous_handler_restored():
    previous = signal.getsignal(signal.SIGTERM)
    with training.StopOnSigterm("pretrain") as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
        error = stop.preempted(37)
    assert signal.getsignal(signal.SIGTERM) is previous
    assert isinstance(error, Preempted) and isinstance(error, UserError) and error.exit_code == 143
    assert str(error).startswith("stopped by SIGTERM at step 37; checkpoint saved;") and "\n" not in str(error)


def test_metrics_trim_drops_later_and_torn_rows(tmp_path):
    log = training.MetricsLog(tmp_path / "m.csv", ("step", "loss"))
    log.append([{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}, {"step": 3, "loss": 0.3}])
    with (tmp_path / "m.csv").open("a") as handle:
        handle.write("1")  # a row torn by a kill: "1" would read as step 1
    log.trim(2)
    assert (tmp_path / "m.csv").read_text() == "step,loss\n1,0.5\n2,0.4\n"
    log.append([{"step": 3, "loss": 0.25}])
    assert (tmp_path / "m.csv").read_text().endswith("2,0.4\n3,0.25\n")


# --- N processes = 1 process ------------------------------------------------------------------
WORKER = """
import json, sys
import autotinybert.pretrain as p
real = p.new_supernet
def no_dropout(config, seed=0):  # dropout masks are drawn per worker tensor: off, to compare layouts
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    return real(config, seed)
p.new_supernet = no_dropout
p.pretrain(p.PretrainSettings(**json.loads(sys.argv[1])))
"""


def test_two_processes_with_half_batches_equal_one_process(tmp_path, monkeypatch):
    import autotinybert.pretrain as pretrain_module

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 30, encoding="utf-8")
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"mode": "kd", "layers": [1, 3], "hidden": [12, 36, 4], "ffn": [13, 37, 4],
                                 "heads": [4, 4], "qkv": [8, 36, 4]}))
    base = PretrainSettings(out=str(tmp_path / "one"), corpus=[str(corpus)], vocab_size=150, space=str(space),
                            sampling="random", samples_per_batch=2, max_steps=4, batch_size=8, seq_len=24,
                            lr=1e-3, eval_every=4, save_every=4, eval_batches=1, cache_dir=str(tmp_path / "cache"),
                            progress=False, seed=3)
    real = pretrain_module.new_supernet

    def no_dropout(config, seed=0):
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
        return real(config, seed)

    monkeypatch.setattr(pretrain_module, "new_supernet", no_dropout)
    pretrain(base)
    pretrain(replace(base, out=str(tmp_path / "accum"), batch_size=4, grad_accum=2))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    two = replace(base, out=str(tmp_path / "two"), batch_size=4)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), json.dumps(asdict(two))], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    one = load_file(str(tmp_path / "one" / "model.safetensors"))
    config = SuperBertConfig.from_dict(json.loads((tmp_path / "one" / "config.json").read_text()))
    initial = new_supernet(config, base.seed).state_dict()
    for layout in ("two", "accum"):
        other = load_file(str(tmp_path / layout / "model.safetensors"))
        assert one.keys() == other.keys()
        for name in one:
            torch.testing.assert_close(other[name], one[name], msg=f"{layout}: {name}")
            if torch.equal(one[name], initial[name]):  # unused by every sampled arch: untouched in both layouts
                assert torch.equal(other[name], initial[name]), f"{layout}: {name} moved"
    assert torch.equal(one["bert.pooler.dense.weight"], initial["bert.pooler.dense.weight"])  # never used
    assert not torch.equal(one["bert.embeddings.word_embeddings.weight"], initial["bert.embeddings.word_embeddings.weight"])


def test_a_run_killed_as_its_folder_appears_can_be_resumed(tmp_path, monkeypatch):
    """config.yaml (what marks a folder as our run) is written with the folder, before any other file:
    a kill at the first instant anything else could appear leaves a folder `--resume` accepts."""
    import autotinybert.pretrain as pretrain_module
    from autotinybert.files import RunDirectory

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 5, encoding="utf-8")
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"mode": "kd", "layers": [1, 2], "hidden": [12, 16, 4], "ffn": [12, 16, 4],
                                 "heads": [2, 2], "qkv": [8, 16, 4]}))
    out = tmp_path / "run"
    settings = PretrainSettings(out=str(out), corpus=[str(corpus)], vocab_size=150, space=str(space), max_steps=2,
                                batch_size=2, seq_len=16, cache_dir=str(tmp_path / "cache"), progress=False)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stands for SIGKILL: nothing after this instant runs

    monkeypatch.setattr(pretrain_module, "_Run", killed)
    with pytest.raises(KeyboardInterrupt):
        pretrain(settings)
    assert (out / "config.yaml").is_file()
    assert RunDirectory.plan(out, resume=True, overwrite=False).work == out
