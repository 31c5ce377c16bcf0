import random

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from autotinybert import SuperBertConfig, SuperBertForPreTraining
from autotinybert.errors import UserError
from autotinybert.export import random_inputs
from autotinybert.checkpoint import load_supernet, save_supernet
from autotinybert.modeling import SuperBertModel
from autotinybert.space import Arch, ArchError, SearchSpace
from conftest import TINY_KD, TINY_MLM, TINY_VOCAB, randomise_parameters, tiny_supernet
from slicing_reference import KD_WRONG, MLM_WRONG, bert_state, reference_forward, reference_state_dict


def _random_bert(space: SearchSpace, seed: int = 0) -> BertForMaskedLM:
    big = space.largest()
    config = BertConfig(vocab_size=TINY_VOCAB, hidden_size=big.hidden_size, num_hidden_layers=big.num_hidden_layers,
                        num_attention_heads=big.num_attention_heads, intermediate_size=big.intermediate_size,
                        max_position_embeddings=40)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        bert = BertForMaskedLM(config)
    randomise_parameters(bert, seed)
    return bert.eval()


def test_largest_sub_model_equals_stock_bert_with_the_same_weights():
    bert = _random_bert(TINY_MLM)
    supernet = tiny_supernet(TINY_MLM, seed=5)
    state = {k: v for k, v in bert.state_dict().items() if not k.startswith("cls.predictions.decoder")}
    incompatible = supernet.load_state_dict(state, strict=False)
    assert incompatible.unexpected_keys == []
    assert sorted(incompatible.missing_keys) == ["bert.pooler.dense.bias", "bert.pooler.dense.weight"]
    supernet.set_arch(TINY_MLM.largest())
    for seed in range(3):
        inputs = random_inputs(TINY_VOCAB, batch=3, seq_len=17, seed=seed)
        with torch.no_grad():
            expected = bert(**inputs).logits
            got = supernet(**inputs, masked_only=False).logits
        torch.testing.assert_close(got, expected)


# --- the sub-model rule, against an independent explicit-indexing reference ---------------------
# Non-largest architectures only (the largest slices nothing). "stock" ones are representable by
# transformers' BertForMaskedLM (qkv == hidden): there transformers' own forward is the reference;
# elsewhere the plain-torch `reference_forward`, itself checked against BertForMaskedLM below.
STOCK_ARCHS = {"mlm": [Arch(2, 27, 29, 3, 27), Arch(1, 18, 21, 2, 18)],     # 3 / 2 of 4 heads
               "kd": [Arch(2, 20, 21, 4, 20), Arch(3, 28, 33, 4, 28)]}      # 5 / 7 of 9 dims per head
OTHER_ARCHS = {"mlm": [Arch(2, 32, 25, 2, 18), Arch(3, 20, 13, 4, 36)],     # qkv < and > hidden
               "kd": [Arch(2, 25, 29, 4, 16), Arch(1, 17, 37, 4, 32)]}
SPACES = {"mlm": TINY_MLM, "kd": TINY_KD}
# What the wrong-rule tests slice: every dimension smaller than the largest, qkv != hidden.
PROBE_ARCH = {"mlm": Arch(2, 32, 25, 2, 18), "kd": Arch(2, 25, 29, 4, 16)}


def _supernet(mode: str):
    # a fit layer in both modes, so its slicing is checked too
    return tiny_supernet(SPACES[mode], seed=3, teacher_hidden_size=11)


def _supernet_outputs(supernet, arch, inputs) -> dict:
    supernet.set_arch(arch)
    with torch.no_grad():
        out = supernet(**inputs, masked_only=False, output_hidden_states=True, output_attention_scores=True)
        pooled = supernet.bert(**inputs).pooler_output
    return {"logits": out.logits, "last_hidden_state": out.last_hidden_state, "hidden_states": out.hidden_states,
            "scores": out.attention_scores, "pooler_output": pooled, "fit_hidden_state": out.fit_hidden_state}


def _assert_same(got: dict, expected: dict) -> None:
    for key, value in expected.items():
        if isinstance(value, tuple):
            assert len(got[key]) == len(value), key
            for index, (a, b) in enumerate(zip(got[key], value)):
                torch.testing.assert_close(a, b, msg=lambda m: f"{key}[{index}]: {m}")
        else:
            torch.testing.assert_close(got[key], value, msg=lambda m: f"{key}: {m}")


def _stock_bert(state: dict, arch: Arch) -> BertForMaskedLM:
    config = BertConfig(vocab_size=TINY_VOCAB, hidden_size=arch.hidden_size, num_hidden_layers=arch.num_hidden_layers,
                        num_attention_heads=arch.num_attention_heads, intermediate_size=arch.intermediate_size,
                        max_position_embeddings=40)
    bert = BertForMaskedLM(config)
    bert.load_state_dict(bert_state(state), strict=True)
    return bert.eval()


def _stock_outputs(bert: BertForMaskedLM, inputs) -> dict:
    with torch.no_grad():
        out = bert(**inputs, output_hidden_states=True)
    return {"logits": out.logits, "hidden_states": out.hidden_states}


@pytest.mark.parametrize("mode, arch", [(m, a) for m in ("mlm", "kd") for a in STOCK_ARCHS[m]], ids=str)
def test_sliced_supernet_equals_stock_bert_built_by_explicit_indexing(mode, arch):
    supernet = _supernet(mode)
    state = reference_state_dict(supernet, arch)
    bert = _stock_bert(state, arch)
    for seed in range(2):
        inputs = random_inputs(TINY_VOCAB, batch=3, seq_len=13, seed=seed)
        expected = _stock_outputs(bert, inputs)
        _assert_same(_supernet_outputs(supernet, arch, inputs), expected)
        # the plain-torch reference is transformers' BERT too, so it may stand in where BERT cannot
        _assert_same(reference_forward(state, arch.num_attention_heads, inputs), expected)


@pytest.mark.parametrize("mode", ["mlm", "kd"])
def test_sliced_supernet_equals_explicit_reference_everywhere(mode):
    """Every sliced tensor kind (all outputs compared, pre-softmax scores and pooler included)."""
    supernet = _supernet(mode)
    space = SPACES[mode]
    rng = random.Random(7)
    sampled = [a for a in (space.sample(rng) for _ in range(6)) if a != space.largest()]
    for index, arch in enumerate(STOCK_ARCHS[mode] + OTHER_ARCHS[mode] + sampled):
        inputs = random_inputs(TINY_VOCAB, batch=3, seq_len=11, seed=index)
        expected = reference_forward(reference_state_dict(supernet, arch), arch.num_attention_heads, inputs)
        _assert_same(_supernet_outputs(supernet, arch, inputs), expected)


@pytest.mark.parametrize("mode, wrong", [("mlm", w) for w in MLM_WRONG] + [("kd", w) for w in KD_WRONG])
def test_a_wrong_slicing_rule_is_detected(mode, wrong):
    """The comparison above has teeth: a reference built by a wrong rule does not match."""
    supernet = _supernet(mode)
    arch = PROBE_ARCH[mode]
    inputs = random_inputs(TINY_VOCAB, batch=3, seq_len=11, seed=0)
    got = _supernet_outputs(supernet, arch, inputs)
    _assert_same(got, reference_forward(reference_state_dict(supernet, arch), arch.num_attention_heads, inputs))
    wrong_reference = reference_forward(reference_state_dict(supernet, arch, wrong=wrong), arch.num_attention_heads,
                                        inputs)
    with pytest.raises(AssertionError):
        _assert_same(got, wrong_reference)


@pytest.mark.parametrize("mode, wrong", [("mlm", "last_heads"), ("mlm", "attention.output.dense"), ("mlm", "value"),
                                         ("kd", "kd_last_dims"), ("kd", "kd_contiguous"),
                                         ("kd", "attention.output.dense"), ("kd", "layers")])
def test_stock_bert_built_by_a_wrong_head_rule_does_not_match(mode, wrong):
    supernet = _supernet(mode)
    arch = STOCK_ARCHS[mode][0]
    inputs = random_inputs(TINY_VOCAB, batch=3, seq_len=13, seed=0)
    got = _supernet_outputs(supernet, arch, inputs)
    with pytest.raises(AssertionError):
        _assert_same(got, _stock_outputs(_stock_bert(reference_state_dict(supernet, arch, wrong=wrong), arch), inputs))


def test_masked_only_loss_equals_full_vocabulary_loss():
    supernet = tiny_supernet(TINY_MLM)
    supernet.set_arch(Arch(2, 20, 21, 2, 18))
    inputs = random_inputs(TINY_VOCAB, seed=1)
    labels = torch.where(torch.rand(inputs["input_ids"].shape, generator=torch.Generator().manual_seed(0)) < 0.3,
                         inputs["input_ids"], torch.full_like(inputs["input_ids"], -100))
    with torch.no_grad():
        sparse = supernet(**inputs, labels=labels)
        dense = supernet(**inputs, labels=labels, masked_only=False)
    assert sparse.logits.shape == ((labels != -100).sum().item(), TINY_VOCAB)
    torch.testing.assert_close(sparse.loss, dense.loss)
    torch.testing.assert_close(sparse.logits, dense.logits[labels != -100])


def test_gradients_reach_only_the_slice_of_the_shared_weights():
    supernet = tiny_supernet(TINY_KD).train()
    arch = Arch(1, 17, 21, 4, 20)  # kd: 4 heads x 5 dims of 9
    supernet.set_arch(arch)
    inputs = random_inputs(TINY_VOCAB, seed=2)
    supernet(**inputs, masked_only=False).logits.sum().backward()
    layer0, layer1 = supernet.bert.encoder.layer[0], supernet.bert.encoder.layer[1]
    grad = layer0.attention.self.query.weight.grad.view(4, 9, 37)
    assert grad[:, :5, :17].abs().sum() > 0
    assert grad[:, 5:, :].abs().sum() == 0 and grad[:, :, 17:].abs().sum() == 0
    assert layer0.intermediate.dense.weight.grad[21:].abs().sum() == 0
    assert layer1.intermediate.dense.weight.grad is None or layer1.intermediate.dense.weight.grad.abs().sum() == 0


def test_forward_outputs_for_kd():
    supernet = tiny_supernet(TINY_KD, teacher_hidden_size=11)
    arch = Arch(2, 21, 25, 4, 16)
    supernet.set_arch(arch)
    inputs = random_inputs(TINY_VOCAB, batch=2, seq_len=9, seed=3)
    out = supernet(**inputs, output_hidden_states=True, output_attention_scores=True, compute_logits=False)
    assert out.logits is None
    assert len(out.hidden_states) == arch.num_hidden_layers + 1
    assert out.last_hidden_state.shape == (2, 9, 21)
    assert out.attention_scores.shape == (2, 4, 9, 9)  # every teacher head kept in kd mode
    assert out.fit_hidden_state.shape == (2, 9, 11)


def test_padding_does_not_change_unpadded_positions():
    supernet = tiny_supernet(TINY_MLM)
    supernet.set_arch(Arch(2, 24, 29, 3, 27))
    ids = torch.randint(1, TINY_VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 4)], dim=1).long()
    with torch.no_grad():
        short = supernet(ids, masked_only=False).logits
        long = supernet(padded, attention_mask=mask, masked_only=False).logits
    torch.testing.assert_close(long[:, :6], short)


def test_set_arch_rejects_architectures_outside_the_space():
    supernet = tiny_supernet(TINY_MLM)
    with pytest.raises(ArchError, match="not in the mlm search space"):
        supernet.set_arch(Arch(4, 36, 37, 4, 36))
    with pytest.raises(ArchError):
        supernet.set_arch("L1-H36-F37-A2-Q20")  # mlm: qkv must be 9 * heads


def test_checkpoint_round_trip_and_bare_encoder(tmp_path):
    supernet = tiny_supernet(TINY_KD, teacher_hidden_size=7)
    save_supernet(supernet, tmp_path)
    loaded = SuperBertForPreTraining.from_pretrained(tmp_path)
    assert loaded.config.search_space == TINY_KD and loaded.config.teacher_hidden_size == 7
    for key, value in supernet.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    encoder = SuperBertModel.from_pretrained(tmp_path)
    arch = TINY_KD.sample(random.Random(0))
    for model in (supernet, loaded, encoder):
        model.set_arch(arch)
    inputs = random_inputs(TINY_VOCAB, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs, masked_only=False).logits,
                                   supernet(**inputs, masked_only=False).logits)
        torch.testing.assert_close(encoder(**inputs).last_hidden_state, supernet.bert(**inputs).last_hidden_state)


def test_same_seed_same_weights_and_global_rng_untouched():
    from autotinybert.modeling import new_supernet

    config = SuperBertConfig.from_space(TINY_MLM, vocab_size=TINY_VOCAB)
    before = torch.random.get_rng_state()
    a, b = new_supernet(config, seed=3), new_supernet(config, seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = new_supernet(config, seed=4)
    assert not torch.equal(a.bert.embeddings.word_embeddings.weight, c.bert.embeddings.word_embeddings.weight)


@pytest.mark.parametrize("damage", ["missing_dir", "no_weights", "truncated", "bad_json", "wrong_type", "vocab"])
def test_bad_checkpoints_are_clear_errors(tmp_path, damage):
    supernet = tiny_supernet(TINY_MLM)
    ckpt = tmp_path / "ckpt"
    save_supernet(supernet, ckpt)
    if damage == "missing_dir":
        ckpt = tmp_path / "nowhere"
    elif damage == "no_weights":
        (ckpt / "model.safetensors").unlink()
    elif damage == "truncated":
        data = (ckpt / "model.safetensors").read_bytes()
        (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "bad_json":
        (ckpt / "config.json").write_text("{not json")
    elif damage == "wrong_type":
        (ckpt / "config.json").write_text('{"model_type": "bert"}')
    elif damage == "vocab":  # config edited to a smaller vocabulary than the weights
        import json

        config = json.loads((ckpt / "config.json").read_text())
        config["vocab_size"] = 50
        (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as err:
        load_supernet(ckpt)
    assert "\n" not in str(err.value)


def test_tokenizer_larger_than_the_vocabulary_is_rejected(tmp_path):
    supernet = tiny_supernet(TINY_MLM)
    save_supernet(supernet, tmp_path)
    (tmp_path / "vocab.txt").write_text("\n".join(f"tok{i}" for i in range(TINY_VOCAB + 5)) + "\n")
    with pytest.raises(UserError, match="vocab_size is 99"):
        load_supernet(tmp_path)
