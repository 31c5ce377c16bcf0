"""A SuperPLM from a pre-trained BERT: importance orders preserve the function, the largest sub-model
is the source, first-k slices keep the important units, and the source teaches it with zero loss."""

import json

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertModel, BertTokenizerFast

from autotinybert import importance
from autotinybert.checkpoint import load_supernet
from autotinybert.cli import main
from autotinybert.pretrain import Teacher, kd_loss
from autotinybert.space import Arch

WORDS = "the cat sat on a mat dog ran to park we read book she wrote letter river flows past old mill".split()
CONFIG = dict(vocab_size=5 + len(WORDS), hidden_size=36, num_hidden_layers=2, num_attention_heads=3,
              intermediate_size=37, max_position_embeddings=40, hidden_dropout_prob=0.0,
              attention_probs_dropout_prob=0.0)


def _tokenizer(path):
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokenizer = BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)})
    assert tokenizer("the cat")["input_ids"] == [2, 5, 6, 3]  # words, not [UNK]
    return tokenizer


def _randomise(model, seed=0):
    """Random LayerNorms and biases (ones/zeros would hide a wrong permutation), and weights large
    enough for attention to depend on them (BERT's 0.02 init attends almost uniformly)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


# Planted importance (`_plant`): per layer, a scale per head (its v rows) and per dim within every
# head (q/k rows; v rows and the attention-output columns they feed). Distinct values: one exact order.
HEAD_SCALE = torch.tensor([[1.0, 2.0, 0.5], [0.5, 1.0, 2.0]])
QK_SCALE = [0.5 + torch.randperm(12, generator=torch.Generator().manual_seed(10 + i)) / 12 for i in range(2)]
V_SCALE = [0.5 + torch.randperm(12, generator=torch.Generator().manual_seed(20 + i)) / 12 for i in range(2)]


def _plant(model, seed=7):
    """Every q (k) row of a layer is one random row times its dim's scale, every v row another
    times its head's and dim's scale, and each attention-output column one random column times its
    dim's scale: weight norms and mean |activations| then rank heads and per-head dims exactly by
    the planted scales, whatever the random rows (q and k alike in every head: equal attention, so
    a head's context norm is proportional to its scale)."""
    g = torch.Generator().manual_seed(seed)
    heads, d = CONFIG["num_attention_heads"], CONFIG["hidden_size"] // CONFIG["num_attention_heads"]
    with torch.no_grad():
        for i, block in enumerate(model.bert.encoder.layer):
            qk, v = QK_SCALE[i].repeat(heads), V_SCALE[i].repeat(heads) * HEAD_SCALE[i].repeat_interleave(d)
            for linear, scale in ((block.attention.self.query, qk), (block.attention.self.key, qk),
                                  (block.attention.self.value, v)):
                linear.weight.copy_(scale[:, None] * torch.randn(1, CONFIG["hidden_size"], generator=g) * 0.3)
                linear.bias.copy_(scale * torch.randn((), generator=g) * 0.3)
            column = torch.randn(CONFIG["hidden_size"], 1, generator=g) * 0.3
            block.attention.output.dense.weight.copy_(column * V_SCALE[i].repeat(heads)[None, :])
    return model


@pytest.fixture
def source(tmp_path):
    """A tiny odd-sized BertForMaskedLM saved as a local checkpoint with its tokenizer."""
    torch.manual_seed(0)
    model = _randomise(BertForMaskedLM(BertConfig(**CONFIG))).eval()
    path = tmp_path / "source"
    model.save_pretrained(path)
    _tokenizer(path).save_pretrained(path)
    return path


def _batch():
    ids = torch.tensor([[2, 5, 6, 7, 8, 9, 10, 3], [2, 11, 12, 13, 3, 0, 0, 0]])
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


@pytest.mark.parametrize("mode, method", [("mlm", "activation"), ("kd", "activation"), ("mlm", "weight"),
                                          ("kd", "weight")])
def test_importance_orders_leave_the_function_unchanged(mode, method):
    torch.manual_seed(1)
    model = _plant(_randomise(BertForMaskedLM(BertConfig(**CONFIG)))).eval()
    shape = importance.Shape.of(model.config)
    scores = (importance.activation_scores(model, [_batch()], shape) if method == "activation"
              else importance.weight_scores(model.state_dict(), shape))
    orders = scores.orders(mode)
    assert not torch.equal(orders.hidden, torch.arange(36)) and not torch.equal(orders.ffn[0], torch.arange(37))
    # Heads and per-head dims: the planted orders, not whatever a seed happens to give.
    if mode == "mlm":
        assert [o.tolist() for o in orders.heads] == [[1, 0, 2], [2, 1, 0]]
    else:
        for layer in range(2):
            for got, planted in ((orders.qk[layer], QK_SCALE[layer]), (orders.v[layer], V_SCALE[layer])):
                expected = torch.argsort(planted, descending=True)
                assert not torch.equal(expected, torch.arange(12))
                assert torch.equal(got, expected.expand(3, -1)), (layer, got, expected)
    permuted = BertForMaskedLM(BertConfig(**CONFIG)).eval()
    permuted.load_state_dict(importance.permute(model.state_dict(), shape, orders), strict=True)
    with torch.no_grad():
        a, b = model(**_batch(), output_hidden_states=True), permuted(**_batch(), output_hidden_states=True)
    torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.hidden_states[-1], a.hidden_states[-1][..., orders.hidden], atol=1e-5, rtol=1e-5)


def test_a_permutation_that_breaks_a_rule_changes_the_function():
    """The check above has teeth: moving Q's rows without K's changes the outputs."""
    torch.manual_seed(1)
    model = _randomise(BertForMaskedLM(BertConfig(**CONFIG))).eval()
    state = dict(model.state_dict())
    rows = torch.randperm(36, generator=torch.Generator().manual_seed(3))
    for key in ("weight", "bias"):
        name = f"bert.encoder.layer.0.attention.self.query.{key}"
        state[name] = state[name][rows]
    broken = BertForMaskedLM(BertConfig(**CONFIG)).eval()
    broken.load_state_dict(state)
    with torch.no_grad():
        assert (broken(**_batch()).logits - model(**_batch()).logits).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["mlm", "kd"])
def test_init_from_a_local_bert_reproduces_it_as_the_largest_sub_model(capsys, tmp_path, source, mode):
    out = tmp_path / "superplm"
    code = main(["init", "--from", str(source), "--mode", mode, "--out", str(out),
                 "--calibration-corpus", str(_corpus(tmp_path)), "--calibration-sequences", "6"])
    assert code == 0, capsys.readouterr().err
    superplm = load_supernet(out).eval()
    record = json.loads((out / "config.json").read_text())["init_from"]
    assert record["mlm_head"] == "source" and record["importance"] == "activation"
    assert record["calibration"]["sequences"] == 6
    space = superplm.config.search_space
    largest = space.largest()
    assert (largest.num_hidden_layers, largest.hidden_size, largest.intermediate_size) == (2, 36, 37)
    assert largest.num_attention_heads == (3 if mode == "kd" else 3) and largest.qkv_size == 36
    assert space.heads.min == (3 if mode == "kd" else 1)
    reference = BertForMaskedLM.from_pretrained(source).eval()
    superplm.set_arch(largest)
    with torch.no_grad():
        expected = reference(**_batch()).logits
        got = superplm(_batch()["input_ids"], _batch()["attention_mask"], masked_only=False).logits
    keep = _batch()["attention_mask"].bool()
    torch.testing.assert_close(got[keep], expected[keep], atol=1e-5, rtol=1e-5)
    assert (out / "tokenizer.json").is_file() or (out / "vocab.txt").is_file()


def test_a_bert_model_without_mlm_head_gets_a_new_tied_head_and_zero_kd_loss(tmp_path):
    """all-MiniLM-L6-v2 is a BertModel: a new head is made and said in the config; in the kd space
    the source, as the KD teacher, sees a largest sub-model it teaches with zero loss."""
    torch.manual_seed(2)
    encoder = _randomise(BertModel(BertConfig(**CONFIG))).eval()
    path = tmp_path / "encoder"
    encoder.save_pretrained(path)
    _tokenizer(path).save_pretrained(path)
    out = tmp_path / "superplm"
    assert main(["init", "--from", str(path), "--out", str(out), "--importance", "weight"]) == 0
    superplm = load_supernet(out).eval()
    assert superplm.config.init_from["mlm_head"] == "new" and superplm.config.init_from["mode"] == "kd"
    assert superplm.cls.predictions.bias.abs().sum() == 0
    teacher = Teacher(path, torch.device("cpu"))
    batch = _batch()
    superplm.set_arch(superplm.config.search_space.largest())
    with torch.no_grad():
        out_ = superplm(batch["input_ids"], batch["attention_mask"], output_attention_scores=True, compute_logits=False)
        hidden, scores = teacher(batch["input_ids"], batch["attention_mask"])
        assert kd_loss(out_.attention_scores, scores, out_.fit_hidden_state, hidden, batch["attention_mask"]) < 1e-9
        small = superplm.config.search_space.smallest()
        superplm.set_arch(small)
        out_ = superplm(batch["input_ids"], batch["attention_mask"], output_attention_scores=True, compute_logits=False)
        assert kd_loss(out_.attention_scores, scores, out_.fit_hidden_state, hidden, batch["attention_mask"]) > 1e-3


def test_activation_order_puts_dead_ffn_neurons_last_so_a_first_k_slice_loses_nothing(tmp_path):
    """Half the FFN neurons of every layer never fire and write nothing: ordered by activation they
    come last, and the sub-model keeping only the live ones computes the same function."""
    torch.manual_seed(3)
    model = _randomise(BertForMaskedLM(BertConfig(**CONFIG))).eval()
    dead = torch.arange(0, 37, 2)                                   # 19 dead neurons, 18 live
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            layer.intermediate.dense.weight[dead] = 0.0
            layer.intermediate.dense.bias[dead] = -20.0             # GELU(-20) == 0
            layer.output.dense.weight[:, dead] = 0.0
    path = tmp_path / "source"
    model.save_pretrained(path)
    _tokenizer(path).save_pretrained(path)
    out = tmp_path / "superplm"
    assert main(["init", "--from", str(path), "--mode", "mlm", "--out", str(out), "--importance", "activation",
                 "--calibration-corpus", str(_corpus(tmp_path))]) == 0
    superplm = load_supernet(out).eval()
    live = Arch(2, 36, 37 - len(dead), 3, 36)
    batch = _batch()
    with torch.no_grad():
        superplm.set_arch(superplm.config.search_space.largest())
        full = superplm(batch["input_ids"], batch["attention_mask"], masked_only=False).logits
        superplm.set_arch(live)
        sliced = superplm(batch["input_ids"], batch["attention_mask"], masked_only=False).logits
    keep = batch["attention_mask"].bool()  # calibration scores real tokens: padding is not scored
    torch.testing.assert_close(sliced[keep], full[keep], atol=1e-5, rtol=1e-5)
    superplm.set_arch(Arch(2, 36, 37 - len(dead) - 1, 3, 36))  # one live neuron fewer: no longer the same
    with torch.no_grad():
        fewer = superplm(batch["input_ids"], batch["attention_mask"], masked_only=False).logits
    assert (fewer[keep] - full[keep]).abs().max() > 1e-4


def test_init_from_refuses_what_it_cannot_use(capsys, tmp_path, source):
    code = main(["init", "--from", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "--from" in err and len(err.strip().splitlines()) == 1
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "model_type": "roberta"}))
    code = main(["init", "--from", str(source), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "model_type 'roberta' is not supported" in err
    code = main(["init", "--from", str(source), "--space", "paper-kd", "--out", str(tmp_path / "o")])
    assert code == 2 and "drop --space" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _corpus(tmp_path):
    path = tmp_path / "calibration.txt"
    docs = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(8)]
    path.write_text("\n\n".join(docs) + "\n")
    return path


def test_develop_starts_from_a_pretrained_source_and_distils_it(tmp_path):
    """pretrain.init_from: the start is written once, pre-training continues from it with the source
    as the KD teacher (sandwich sampling), and the pipeline finishes."""
    from develop_fixtures import NEGATIVE, POSITIVE, SENTENCES, tiny_config

    from autotinybert.develop import develop, validate_config

    words = sorted({w for s in SENTENCES for w in s.split()} | set(POSITIVE) | set(NEGATIVE) | {"day"})
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    torch.manual_seed(4)
    model = _randomise(BertModel(BertConfig(**{**CONFIG, "vocab_size": len(tokens)}))).eval()
    source = tmp_path / "source"
    model.save_pretrained(source)
    BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}).save_pretrained(source)
    config = tiny_config(tmp_path / "fixtures")
    for key in ("space", "vocab_size"):
        config["pretrain"].pop(key)
    config["pretrain"].update(init_from=str(source), init_mode="kd", init_calibration_sequences=4, objective="kd",
                              sampling="sandwich", max_steps=2, save_every=2, eval_every=2)
    config["further_train"]["objective"] = "kd"
    config["search"]["metric"] = "mlm_loss"
    manifest = develop(validate_config(config), tmp_path / "run", log=lambda _: None)
    start = tmp_path / "run" / "pretrain_start"
    assert json.loads((start / "config.json").read_text())["init_from"]["source"] == str(source)
    superplm = json.loads((tmp_path / "run" / "pretrain" / "config.json").read_text())
    assert superplm["init_from"]["mode"] == "kd" and superplm["space"]["hidden"]["max"] == 36
    used = (tmp_path / "run" / "pretrain" / "config.yaml").read_text()
    assert f"teacher: {source}" in used and "sampling: sandwich" in used
    assert manifest["stages"]["finetune"]["status"] == "done"
    # The source, fine-tuned with the same budget, is the reference of the report and the table.
    assert set(manifest["stages"]["finetune"]["outputs"]["runs"]) == {*manifest["stages"]["search"]["outputs"]["best"],
                                                                      "source"}
    summary = (tmp_path / "run" / "report" / "summary.md").read_text()
    assert "score vs source" in summary and "% of reference" in summary and "source L2-H36-F37-A3-Q36" in summary


def test_evaluate_table_compares_every_row_with_the_reference(capsys, tmp_path):
    def run(name, scores):
        path = tmp_path / name
        path.mkdir()
        tasks = {t: {"score": s, "scores": {"dev": {"accuracy": s}}, "metric": "accuracy"} for t, s in scores.items()}
        (path / "results.json").write_text(json.dumps({"model": str(path), "tasks": tasks}))
        return path

    source = run("source", {"sst2": 90.0, "rte": 60.0})
    small = run("small", {"sst2": 81.0, "rte": 54.0})
    assert main(["evaluate", "--table", str(small), "--reference", str(source)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "% of reference" in lines[0] and lines[2].startswith("| source") and lines[2].endswith("100.0% |")
    assert lines[3].startswith("| small") and lines[3].endswith(" 90.0% |")  # (81 + 54) / (90 + 60)
    assert main(["evaluate", "--model", str(small), "--reference", str(source)]) == 2


def test_layer_mapped_hidden_term_maps_student_layers_onto_teacher_layers(tmp_path):
    """--kd-layers mapped: student layer i of L learns from teacher layer round(i * L_t / L). From a
    3-layer source, the largest sub-model is the source (term 0); the 2-layer one's first layer (the
    source's layer 1) is held against the source's layer 2, the exact MSE between those two."""
    from autotinybert.pretrain import layer_map, step_loss

    assert layer_map(2, 6) == [3, 6] and layer_map(4, 6) == [2, 3, 4, 6] and layer_map(3, 3) == [1, 2, 3]
    torch.manual_seed(3)
    encoder = _randomise(BertModel(BertConfig(**{**CONFIG, "num_hidden_layers": 3}))).eval()
    path = tmp_path / "encoder"
    encoder.save_pretrained(path)
    _tokenizer(path).save_pretrained(path)
    assert main(["init", "--from", str(path), "--out", str(tmp_path / "superplm"), "--importance", "none"]) == 0
    superplm = load_supernet(tmp_path / "superplm").eval()
    teacher = Teacher(path, torch.device("cpu"))
    batch = {**_batch(), "original_ids": _batch()["input_ids"]}
    largest = superplm.config.search_space.largest()
    with torch.no_grad():
        superplm.set_arch(largest)
        _, full = step_loss(superplm, batch, "kd", teacher, kd_layers="mapped")
        superplm.set_arch(Arch(2, largest.hidden_size, largest.intermediate_size, largest.num_attention_heads,
                               largest.qkv_size))
        _, two = step_loss(superplm, batch, "kd", teacher, kd_layers="mapped")
        _, last_only = step_loss(superplm, batch, "kd", teacher)
    assert full["kd_mapped_loss"] < 1e-9 and full["kd_loss"] < 1e-9
    keep = batch["attention_mask"].bool()
    expected = torch.nn.functional.mse_loss(teacher.layers[0][keep], teacher.layers[1][keep]).item()
    assert two["kd_mapped_loss"] == pytest.approx(expected, rel=1e-4) and expected > 1e-3
    assert "kd_mapped_loss" not in last_only and last_only["kd_loss"] == pytest.approx(two["kd_loss"])
