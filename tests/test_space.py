import json
import random

import pytest

from autotinybert.errors import UserError
from autotinybert.space import (
    RELEASED, Arch, ArchError, Dim, MutationRates, SearchSpace, parameter_count, released,
)
from conftest import TINY_KD, TINY_MLM


def test_arch_is_a_hashable_value_that_round_trips():
    arch = Arch(5, 564, 1054, 8, 512)
    assert arch == Arch.from_json(arch.to_json()) == Arch.parse(str(arch)) == Arch.parse(arch.to_json())
    assert str(arch) == "L5-H564-F1054-A8-Q512"
    assert len({arch, Arch(5, 564, 1054, 8, 512), Arch(4, 564, 1054, 8, 512)}) == 2
    assert json.loads(arch.to_json())["intermediate_size"] == 1054
    assert arch.head_size == 64 and not arch.is_bert_compatible
    assert Arch(2, 36, 37, 4, 36).is_bert_compatible
    with pytest.raises(AttributeError):
        arch.hidden_size = 3  # frozen


@pytest.mark.parametrize("bad", [
    dict(num_hidden_layers=0, hidden_size=8, intermediate_size=8, num_attention_heads=1, qkv_size=8),
    dict(num_hidden_layers=1, hidden_size=8.0, intermediate_size=8, num_attention_heads=1, qkv_size=8),
    dict(num_hidden_layers=True, hidden_size=8, intermediate_size=8, num_attention_heads=1, qkv_size=8),
    dict(num_hidden_layers=1, hidden_size=8, intermediate_size=8, num_attention_heads=3, qkv_size=8),
])
def test_arch_validates_itself(bad):
    with pytest.raises(ArchError):
        Arch(**bad)


@pytest.mark.parametrize("text", ["L5-H564", "l5-h564-f1054-a8-q512", "L5-H564-F1054-A8-Q-1", "", "{bad json",
                                  '{"num_hidden_layers": 1}'])
def test_malformed_arch_strings_are_clear_errors(text):
    with pytest.raises(ArchError):
        Arch.parse(text)


def test_paper_spaces_contain_every_released_architecture():
    mlm, kd = SearchSpace.paper("mlm"), SearchSpace.paper("kd")
    for item in RELEASED:
        space = mlm if item.mode == "mlm" else kd
        assert space.contains(item.arch), (item.name, space.why_not(item.arch))
    assert len(released("mlm")) == len(released("kd")) == 4
    # S1's FFN 1054 is off the 128 + 4k grid: membership must not be grid membership.
    s1 = released("mlm")[0].arch
    assert (s1.intermediate_size - 128) % 4 != 0 and mlm.contains(s1)
    # structural rules
    assert not mlm.contains(Arch(5, 564, 1054, 8, 528))       # mlm: qkv must be 64 * heads
    assert not kd.contains(Arch(5, 564, 1054, 8, 512))        # kd: 12 heads
    assert not kd.contains(Arch(5, 564, 1054, 12, 168))       # kd: qkv below 180
    assert not mlm.contains(Arch(9, 564, 1054, 8, 512))       # layers 1..8
    assert "qkv_size" in mlm.why_not(Arch(5, 564, 1054, 8, 528))


def test_paper_space_facts():
    mlm, kd = SearchSpace.paper("mlm"), SearchSpace.paper("kd")
    assert mlm.largest() == Arch(8, 768, 3072, 12, 768) and mlm.smallest() == Arch(1, 128, 128, 1, 64)
    assert kd.largest() == Arch(8, 768, 3072, 12, 768) and kd.smallest() == Arch(1, 128, 128, 12, 180)
    assert mlm.size() == 8 * 161 * 737 * 12
    assert kd.size() == 8 * 161 * 737 * 50
    assert kd.max_head_size == 64 and mlm.max_head_size == 64


@pytest.mark.parametrize("space", [TINY_MLM, TINY_KD], ids=["mlm", "kd"])
def test_grid_is_lazy_complete_and_inside(space):
    grid = space.grid()
    assert iter(grid) is grid  # a generator, not a list
    archs = list(grid)
    assert len(archs) == len(set(archs)) == space.size()
    assert all(space.contains(a) for a in archs)
    assert space.largest() in archs and space.smallest() in archs
    first = next(SearchSpace.paper("kd").grid())  # millions: must not be materialised
    assert first == SearchSpace.paper("kd").smallest()


@pytest.mark.parametrize("space", [TINY_MLM, TINY_KD, SearchSpace.paper("mlm"), SearchSpace.paper("kd")])
def test_sampling_is_seeded_on_grid_and_covers_the_space(space):
    draws = [space.sample(random.Random(7)) for _ in range(2)]
    assert draws[0] == draws[1]
    rng = random.Random(0)
    sample = [space.sample(rng) for _ in range(500)]
    assert all(space.contains(a) for a in sample)
    assert all((a.hidden_size - space.hidden.min) % space.hidden.step == 0 for a in sample)
    assert {a.num_hidden_layers for a in sample} == set(space.layers.values())


@pytest.mark.parametrize("space", [TINY_MLM, TINY_KD, SearchSpace.paper("kd")])
def test_mutation_stays_in_space_and_moves_within_bounds(space):
    rng = random.Random(3)
    arch = space.sample(rng)
    always = MutationRates(layers=(1.0, 1), hidden=(1.0, 1), ffn=(1.0, 2), heads_or_qkv=(1.0, 2))
    for _ in range(300):
        child = space.mutate(arch, rng, always)
        assert space.contains(child)
        assert abs(child.num_hidden_layers - arch.num_hidden_layers) <= 1
        assert abs(child.hidden_size - arch.hidden_size) <= space.hidden.step
        assert abs(child.intermediate_size - arch.intermediate_size) <= 2 * space.ffn.step
        arch = child
    never = MutationRates(layers=(0.0, 1), hidden=(0.0, 1), ffn=(0.0, 2), heads_or_qkv=(0.0, 2))
    assert space.mutate(arch, rng, never) == arch
    # same seed, same mutation
    assert space.mutate(arch, random.Random(1)) == space.mutate(arch, random.Random(1))


def test_mutating_an_off_grid_architecture_snaps_onto_the_grid():
    space = SearchSpace.paper("mlm")
    s1 = Arch(5, 564, 1054, 8, 512)
    rates = MutationRates(layers=(0.0, 1), hidden=(0.0, 1), ffn=(1.0, 2), heads_or_qkv=(0.0, 2))
    child = space.mutate(s1, random.Random(0), rates)
    assert (child.intermediate_size - 128) % 4 == 0 and abs(child.intermediate_size - 1054) <= 10


def test_features_are_numeric_in_field_order():
    arch = Arch(5, 564, 1054, 8, 512)
    assert SearchSpace.features(arch) == (5.0, 564.0, 1054.0, 8.0, 512.0)


def test_space_files_round_trip(tmp_path):
    import yaml

    for space in (TINY_MLM, TINY_KD, SearchSpace.paper("kd")):
        (tmp_path / "s.json").write_text(json.dumps(space.to_dict()))
        (tmp_path / "s.yaml").write_text(yaml.safe_dump(space.to_dict()))
        assert SearchSpace.from_file(tmp_path / "s.json") == space == SearchSpace.load(tmp_path / "s.yaml")
    (tmp_path / "list.yaml").write_text("mode: mlm\nlayers: [1, 4]\nhidden: [64, 128, 16]\nffn: [64, 256, 16]\n"
                                        "heads: [1, 2]\nhead_size: 32\n")
    space = SearchSpace.load(tmp_path / "list.yaml")
    assert space.hidden == Dim(64, 128, 16) and space.largest() == Arch(4, 128, 256, 2, 64)
    assert SearchSpace.load("paper-kd") == SearchSpace.paper("kd")


@pytest.mark.parametrize("text, message", [
    ("mode: xx\nlayers: [1, 2]\nhidden: [8, 16]\nffn: [8, 16]\nheads: [1, 2]\n", "unknown search-space mode"),
    ("mode: kd\nlayers: [1, 2]\nhidden: [8, 16]\nffn: [8, 16]\nheads: [1, 2]\nqkv: [12, 24]\n", "fixes the head count"),
    ("mode: kd\nlayers: [1, 2]\nhidden: [8, 16]\nffn: [8, 16]\nheads: [4, 4]\nqkv: [10, 24, 2]\n", "multiples"),
    ("mode: mlm\nlayers: [3, 2]\nhidden: [8, 16]\nffn: [8, 16]\nheads: [1, 2]\n", "range is empty"),
    ("mode: mlm\nlayers: [1, 2]\nhidden: [8, 16]\nffn: [8, 16]\n", "missing 'heads'"),
    ("mode: mlm\nlayers: [1, 2]\nhidden: [8, 16]\nffn: [8, 16]\nheads: [1, 2]\nwidth: 3\n", "unknown search-space keys"),
    ("mode: [unclosed\n", "does not parse"),
])
def test_bad_space_files_are_clear_errors(tmp_path, text, message):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        SearchSpace.from_file(path)


def test_with_limits_shrinks_maxima_onto_the_grid():
    small = SearchSpace.paper("kd").with_limits(layers=4, hidden=300, ffn=1000, qkv=400)
    assert small.largest() == Arch(4, 300, 1000, 12, 396)
    assert small.smallest() == SearchSpace.paper("kd").smallest()
    with pytest.raises(UserError):
        SearchSpace.paper("kd").with_limits(heads=6)
    with pytest.raises(UserError):
        SearchSpace.paper("mlm").with_limits(hidden=64)


def test_parameter_count_of_bert_base_is_the_known_value():
    # BertModel (with pooler) for bert-base-uncased has 109,482,240 parameters.
    assert parameter_count(Arch(12, 768, 3072, 12, 768), pooler=True) == 109_482_240
