import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertModel

from autotinybert.data import train_wordpiece
from autotinybert.errors import UserError
from autotinybert.modeling import SuperBertConfig, new_supernet
from autotinybert.pretrain import ArchSampler, PretrainSettings, Teacher, pretrain, step_loss
from autotinybert.space import Arch, Dim, SearchSpace
from conftest import REPO, SHARED_DATA, randomise_parameters
from test_data import TEXT

SPACE = {"mode": "kd", "layers": [1, 2], "hidden": [12, 36, 4], "ffn": [13, 37, 4], "heads": [4, 4], "qkv": [8, 36, 4]}


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT * 30, encoding="utf-8")
    return path


@pytest.fixture
def space_file(tmp_path):
    path = tmp_path / "space.json"
    path.write_text(json.dumps(SPACE))
    return path


def _settings(tmp_path, corpus, space_file, **overrides):
    base = PretrainSettings(out=str(tmp_path / "run"), corpus=[str(corpus)], vocab_size=150, space=str(space_file),
                            max_steps=6, batch_size=4, seq_len=24, lr=1e-3, log_every=1, eval_every=3,
                            save_every=2, eval_batches=1, cache_dir=str(tmp_path / "cache"), progress=False)
    return replace(base, **overrides)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def test_sampling_rules_are_seeded_and_shared():
    space = SearchSpace.from_dict(SPACE)
    shared = ArchSampler(space, "random", 2, seed=3)
    assert shared.archs(5, rank=0) == shared.archs(5, rank=1) == ArchSampler(space, "random", 2, seed=3).archs(5, 0)
    assert len(shared.archs(5, 0)) == 2 and shared.archs(5, 0) != shared.archs(6, 0)
    own = ArchSampler(space, "per-worker", 1, seed=3)
    assert any(own.archs(s, 0) != own.archs(s, 1) for s in range(10))
    sandwich = ArchSampler(space, "sandwich", 1, seed=3).archs(0, 0)
    assert sandwich[:2] == [space.largest(), space.smallest()] and len(sandwich) == 3


def test_kill_and_resume_gives_the_same_weights(tmp_path, corpus, space_file):
    straight = _settings(tmp_path, corpus, space_file, out=str(tmp_path / "straight"))
    pretrain(straight)

    class Killed(Exception):
        pass

    def kill_at_five(step):
        if step == 5:  # after step 5, before its checkpoint: the run loses step 5
            raise Killed

    interrupted = _settings(tmp_path, corpus, space_file, out=str(tmp_path / "killed"))
    with pytest.raises(Killed):
        pretrain(interrupted, on_step=kill_at_five)
    assert json.loads((tmp_path / "killed" / "checkpoint" / "trainer_state.json").read_text())["step"] == 4
    summary = pretrain(interrupted, resume=True)
    assert summary["resumed_from"] == 4
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    def without_timing(run):  # tokens/s is the one column that depends on the clock
        return [line.rsplit(",", 1)[0] for line in (tmp_path / run / "metrics.csv").read_text().splitlines()]

    rows = without_timing("killed")
    assert rows == without_timing("straight")
    assert sum(1 for r in rows if ",train," in r) == 6  # step 5's row was dropped and re-logged once


def test_loss_decreases_on_real_text(tmp_path, space_file):
    source = SHARED_DATA / "corpus" / "news.txt"
    if not source.is_file():
        pytest.skip("../shared/data/corpus is not available")
    lines = source.read_text(encoding="utf-8").splitlines()[:1500]
    corpus = tmp_path / "news.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    settings = PretrainSettings(out=str(tmp_path / "run"), corpus=[str(corpus)], vocab_size=400, space=str(space_file),
                                max_steps=60, batch_size=16, seq_len=32, lr=3e-3, warmup_ratio=0.05, eval_every=60,
                                save_every=60, log_every=1, cache_dir=str(tmp_path / "cache"), progress=False)
    pretrain(settings)
    import csv

    with (tmp_path / "run" / "metrics.csv").open() as handle:
        losses = [float(r["loss"]) for r in csv.DictReader(handle) if r["split"] == "train"]
    import statistics

    first, last = statistics.mean(losses[:10]), statistics.mean(losses[-10:])
    noise = statistics.stdev(losses[:10])
    assert last < first - 3 * noise, (first, last, noise)  # a drop well beyond step-to-step noise


def _tiny_teacher(tmp_path: Path, vocab_size: int, heads: int = 4) -> Path:
    config = BertConfig(vocab_size=vocab_size, hidden_size=36, num_hidden_layers=2, num_attention_heads=heads,
                        intermediate_size=37, max_position_embeddings=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        teacher = BertModel(config, add_pooling_layer=False)
    randomise_parameters(teacher)
    path = tmp_path / f"teacher{heads}"
    teacher.save_pretrained(path)
    return path


def test_kd_loss_is_zero_when_the_student_is_the_teachers_slice(tmp_path, corpus):
    tokenizer = train_wordpiece([corpus], 150, tmp_path / "tok")
    teacher_dir = _tiny_teacher(tmp_path, len(tokenizer))
    teacher = Teacher(teacher_dir, torch.device("cpu"))
    space = SearchSpace(mode="kd", layers=Dim(1, 2), hidden=Dim(12, 36, 4), ffn=Dim(13, 37, 4), heads=Dim(4, 4),
                        qkv=Dim(8, 36, 4))
    teacher.check_fits(space, len(tokenizer))
    config = SuperBertConfig.from_space(space, vocab_size=len(tokenizer), max_position_embeddings=64,
                                        teacher_hidden_size=36)
    student = new_supernet(config, 0).eval()
    state = {f"bert.{k}": v for k, v in teacher.model.state_dict().items()}
    result = student.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    with torch.no_grad():
        student.fit_dense.weight.copy_(torch.eye(36))
        student.fit_dense.bias.zero_()
    student.set_arch(space.largest())
    ids = torch.randint(5, len(tokenizer), (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    batch = {"input_ids": ids, "original_ids": ids, "attention_mask": mask, "labels": None}
    with torch.no_grad():
        loss, parts = step_loss(student, batch, "kd", teacher)
    assert loss.item() < 1e-10
    student.set_arch(Arch(2, 36, 37, 4, 20))  # a narrower slice is a different model
    with torch.no_grad():
        assert step_loss(student, batch, "kd", teacher)[0].item() > 1e-3


def test_validation_runs_the_teacher_once_per_batch_and_scores_as_the_live_teacher(tmp_path, corpus):
    """Every architecture is scored on the same fixed batches, so the teacher's outputs are recorded
    once (`RecordedTeacher`): its forward count is the number of batches, not batches x architectures,
    and each KD loss is what the live teacher gives on those batches."""
    from autotinybert.data import build_dataset
    from autotinybert.pretrain import evaluate, validation_batches, validation_row

    tokenizer = train_wordpiece([corpus], 150, tmp_path / "tok")
    teacher = Teacher(_tiny_teacher(tmp_path, len(tokenizer)), torch.device("cpu"))
    space = SearchSpace(mode="kd", layers=Dim(1, 2), hidden=Dim(12, 36, 4), ffn=Dim(13, 37, 4), heads=Dim(4, 4),
                        qkv=Dim(8, 36, 4))
    config = SuperBertConfig.from_space(space, vocab_size=len(tokenizer), max_position_embeddings=64,
                                        teacher_hidden_size=36)
    student = new_supernet(config, 0)
    _, valid, _ = build_dataset([corpus], tokenizer, 16, tmp_path / "cache", [corpus])
    forwards = []
    teacher.model.register_forward_hook(lambda *_: forwards.append(1))
    archs = [space.largest(), space.smallest(), Arch(2, 24, 25, 4, 16)]
    rows = evaluate(student, valid, tokenizer, archs, "kd", teacher, 4, 3, 0, torch.device("cpu"))
    assert len(forwards) == 3  # once per batch
    fixed = validation_batches(valid, tokenizer, 4, 3, 0, torch.device("cpu"))
    student.eval()
    for arch in archs:
        student.set_arch(arch)
        with torch.no_grad():
            live = sum(step_loss(student, batch, "kd", teacher)[1]["kd_loss"] for batch in fixed) / len(fixed)
        assert rows[str(arch)]["kd_loss"] == pytest.approx(live, rel=1e-6)
        assert rows[str(arch)]["mlm_loss"] > 0
    # the proxy's kd_loss skips the MLM head and gives the same KD loss; the model's state is restored
    from autotinybert.pretrain import RecordedTeacher

    student.train()
    student.set_arch(archs[0])
    only_kd = validation_row(student, archs[2], fixed, RecordedTeacher(teacher, fixed), mlm=False)
    assert set(only_kd) == {"kd_loss"} and only_kd["kd_loss"] == pytest.approx(rows[str(archs[2])]["kd_loss"])
    assert student.training and student.arch == archs[0]


def test_kd_pretraining_runs_and_rejects_teachers_that_do_not_fit(tmp_path, corpus, space_file):
    tokenizer = train_wordpiece([corpus], 150, tmp_path / "tok")
    good = _tiny_teacher(tmp_path, len(tokenizer))
    settings = _settings(tmp_path, corpus, space_file, vocab_size=None, tokenizer=str(tmp_path / "tok"),
                         objective="both", teacher=str(good), max_steps=2)
    summary = pretrain(settings)
    assert all("kd_loss" in row for row in summary["validation"].values())
    wrong_heads = _tiny_teacher(tmp_path, len(tokenizer), heads=6)
    with pytest.raises(UserError, match="6 heads"):
        pretrain(replace(settings, out=str(tmp_path / "r2"), teacher=str(wrong_heads)))
    with pytest.raises(UserError, match="vocabulary"):
        pretrain(replace(settings, out=str(tmp_path / "r3"), tokenizer=None, vocab_size=120))
    with pytest.raises(UserError, match="mlm space"):
        pretrain(replace(settings, out=str(tmp_path / "r4"), space="paper-mlm", max_layers=1))


def test_corrupt_checkpoint_on_resume_is_a_clear_error(tmp_path, corpus, space_file):
    settings = _settings(tmp_path, corpus, space_file, max_steps=2)
    pretrain(settings)
    ckpt = tmp_path / "run" / "checkpoint"
    state = ckpt / json.loads((ckpt / "trainer_state.json").read_text())["generation"] / "optimizer.safetensors"
    state.write_bytes(state.read_bytes()[:50])
    assert not list(ckpt.rglob("*.pt"))  # no pickle: safetensors + JSON only
    weights_before = _weights(tmp_path / "run")
    with pytest.raises(UserError, match="corrupt"):
        pretrain(replace(settings, max_steps=4), resume=True)
    after = _weights(tmp_path / "run")
    assert all(torch.equal(weights_before[k], after[k]) for k in after)  # nothing lost
    with pytest.raises(UserError, match="not empty; pass --resume to continue it, --overwrite"):
        pretrain(settings)
    with pytest.raises(UserError, match="different lr"):
        pretrain(replace(settings, lr=0.5), resume=True)


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tmp_path, corpus, space_file):
    settings = _settings(tmp_path, corpus, space_file, max_steps=40, lr=1e30, max_grad_norm=1e30, save_every=1)
    with pytest.raises(UserError, match="loss became (nan|inf)"):
        pretrain(settings)
    state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] >= 1 and all(torch.isfinite(v).all() for v in _weights(tmp_path / "run").values())


def test_further_training_of_one_architecture_exports_a_checkpoint(tmp_path, corpus, space_file):
    from transformers import AutoModelForMaskedLM

    base = _settings(tmp_path, corpus, space_file, max_steps=2)
    pretrain(base)
    further = replace(base, out=str(tmp_path / "further"), arch="L1-H20-F21-A4-Q12", init=str(tmp_path / "run"),
                      max_steps=2)
    pretrain(further)
    model = AutoModelForMaskedLM.from_pretrained(tmp_path / "further" / "exported", trust_remote_code=True)
    assert model.config.qkv_size == 12 and model.config.hidden_size == 20
    # continue from the extracted checkpoint itself (bf16 autocast): its weights are the starting point
    again = replace(further, out=str(tmp_path / "again"), init=str(tmp_path / "further" / "exported"),
                    max_steps=1, bf16=True)
    from autotinybert.pretrain import initial_weights, resolve_space
    from autotinybert.modeling import SuperBertConfig, new_supernet

    config = SuperBertConfig.from_space(resolve_space(again), vocab_size=model.config.vocab_size)
    student = new_supernet(config, seed=99)
    initial_weights(student, again)
    exported = model.state_dict()
    for key, value in student.state_dict().items():
        if key in exported:
            assert torch.equal(value, exported[key]), key
    assert pretrain(again)["steps"] == 1


def test_cli_errors_for_bad_corpora(tmp_path, capsys, space_file):
    from autotinybert.cli import main

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code = main(["pretrain", "--corpus", str(empty), "--vocab-size", "120", "--space", str(space_file),
                 "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1


WORKER = """
import json, sys
from autotinybert.pretrain import PretrainSettings, pretrain, init_workers
summary = pretrain(PretrainSettings(**json.loads(sys.argv[1])))
rank = init_workers().rank
with open(f"{sys.argv[2]}/digest{rank}.txt", "w") as handle:
    handle.write(summary["weights_digest"])
"""


def test_torchrun_two_workers_stay_in_sync(tmp_path, corpus, space_file):
    from dataclasses import asdict

    settings = _settings(tmp_path, corpus, space_file, max_steps=3, save_every=3, eval_every=3, sampling="per-worker")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         str(script), json.dumps(asdict(settings)), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    digests = [(tmp_path / f"digest{rank}.txt").read_text() for rank in (0, 1)]
    assert digests[0] == digests[1]  # the two workers hold identical weights after every step
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["workers"] == 2 and results["weights_digest"] == digests[0]


def test_metrics_go_to_tensorboard_when_installed(tmp_path, corpus, space_file):
    pytest.importorskip("tensorboard")
    pretrain(_settings(tmp_path, corpus, space_file, max_steps=2))
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("distill_from", ["teacher", "largest"])
def test_in_place_distillation_teaches_the_smaller_sub_models_with_the_largest(tmp_path, corpus, space_file,
                                                                               monkeypatch, distill_from):
    """--distill-from largest: in a sandwich step the largest sub-model learns from the teacher and
    every other sub-model from the largest's own (gradient-free) outputs; teacher: all from the teacher."""
    from autotinybert.pretrain import objectives  # step_loss calls kd_loss there

    tokenizer = train_wordpiece([corpus], 150, tmp_path / "tok")
    teacher = _tiny_teacher(tmp_path, len(tokenizer))
    targets: list[torch.Tensor] = []
    real_kd_loss = objectives.kd_loss

    def recording(student_scores, teacher_scores, student_fit, teacher_hidden, *args):
        targets.append(teacher_hidden)
        return real_kd_loss(student_scores, teacher_scores, student_fit, teacher_hidden, *args)

    monkeypatch.setattr(objectives, "kd_loss", recording)
    settings = _settings(tmp_path, corpus, space_file, vocab_size=None, tokenizer=str(tmp_path / "tok"),
                         objective="kd", teacher=str(teacher), sampling="sandwich", distill_from=distill_from,
                         max_steps=1, eval_every=100)
    pretrain(settings)
    largest, smallest, random_draw = targets[:3]  # step 1's sandwich, in training order
    assert not any(t.requires_grad for t in targets[:3])
    if distill_from == "largest":
        assert torch.equal(smallest, random_draw) and not torch.allclose(smallest, largest)
        with pytest.raises(UserError, match="--sampling sandwich"):
            replace(settings, sampling="random")
    else:
        assert torch.equal(largest, smallest) and torch.equal(smallest, random_draw)


def test_in_place_distillation_with_mapped_layers_maps_onto_the_largest_sub_models_layers(tmp_path, corpus,
                                                                                          space_file, monkeypatch):
    """--distill-from largest --kd-layers mapped: the smaller sub-models' layer targets are the
    largest sub-model's own layers (one per layer of the largest, through the fit layer), not the
    teacher's; the largest itself still maps onto the teacher's layers."""
    from autotinybert.pretrain import objectives  # step_loss calls mapped_hidden_loss there

    tokenizer = train_wordpiece([corpus], 150, tmp_path / "tok")
    teacher = _tiny_teacher(tmp_path, len(tokenizer))
    layer_targets: list[tuple[torch.Tensor, ...]] = []
    real_mapped = objectives.mapped_hidden_loss

    def recording(student_fit, teacher_layers, attention_mask):
        layer_targets.append(tuple(teacher_layers))
        return real_mapped(student_fit, teacher_layers, attention_mask)

    monkeypatch.setattr(objectives, "mapped_hidden_loss", recording)
    pretrain(_settings(tmp_path, corpus, space_file, vocab_size=None, tokenizer=str(tmp_path / "tok"), objective="kd",
                       teacher=str(teacher), sampling="sandwich", distill_from="largest", kd_layers="mapped",
                       max_steps=1, eval_every=100))
    from_teacher, *from_largest = layer_targets[:3]  # step 1's sandwich: largest, smallest, random
    assert all(len(layers) == SPACE["layers"][1] for layers in from_largest)
    assert all(t.shape[-1] == 36 for t in from_teacher)  # the teacher's width (the fit layer maps students onto it)
    for layers in from_largest:
        assert all(torch.equal(a, b) for a, b in zip(layers, from_largest[0]))
        assert not any(torch.equal(a, b) for a, b in zip(layers, from_teacher))


def test_resume_refuses_a_change_of_every_option_not_declared_free(tmp_path, corpus, space_file):
    """Derived from the declarations, so a new option is covered: on --resume every option must keep
    its recorded value unless declared ``resume="free"`` (those may change)."""
    from autotinybert import pretrain as pretrain_module
    from autotinybert.checkpoint import load_supernet
    from autotinybert.options import options_of
    from autotinybert.training import adamw

    settings = _settings(tmp_path, corpus, space_file, max_steps=2)
    pretrain(settings)
    run, state_file = tmp_path / "run", tmp_path / "run" / "checkpoint" / "trainer_state.json"
    original = state_file.read_text()
    model = load_supernet(run)
    optimizer = adamw(model, settings.lr, settings.weight_decay)
    options = options_of(PretrainSettings)
    assert {"distill_from", "kd_layers", "text_column"} <= {o.field for o in options if o.spec.resume != "free"}
    for opt in options:
        state = json.loads(original)
        state["settings"][opt.field] = ["recorded", opt.field]  # never the value given now
        state_file.write_text(json.dumps(state))
        if opt.spec.resume == "free":
            assert pretrain_module.load_checkpoint(run, model, optimizer, settings) == 2, opt.field
        else:
            with pytest.raises(UserError, match=f"--resume with different {opt.field} than the checkpoint"):
                pretrain_module.load_checkpoint(run, model, optimizer, settings)
    state_file.write_text(original)
    with pytest.raises(UserError, match="different kd_layers"):  # the whole command, a real KD-mode change
        pretrain(replace(settings, kd_layers="mapped", max_steps=4), resume=True)
    assert pretrain(replace(settings, max_steps=4, log_every=2, progress=False), resume=True)["resumed_from"] == 2
