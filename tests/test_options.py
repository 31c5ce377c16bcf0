"""Each option is declared once (settings.py); the CLI, develop's YAML and torchrun agree with it."""

import dataclasses
import inspect

import pytest
import yaml

from autotinybert import settings as S
from autotinybert.cli import COMMANDS, LATENCY_COMMANDS, build_parser, main
from autotinybert.develop.config import SECTIONS, config_path, load_config, section_options, validate_config
from autotinybert.errors import UserError
from autotinybert.options import MISSING, as_plain, OptionError, add_options, from_namespace, option, options_of, to_arguments

SETTINGS = [cls for _, cls in inspect.getmembers(S, inspect.isclass)
            if dataclasses.is_dataclass(cls) and cls.__module__ == S.__name__ and options_of(cls)]
# Required values for commands whose flags are mandatory (everything else stays at its default).
REQUIRED = {"pretrain": ["--out", "o", "--corpus", "c"], "extract": ["--supernet", "s", "--arch", "L1-H8-F8-A1-Q8",
                                                                     "--out", "o"],
            "init": ["--out", "o"], "finetune": ["--model", "m", "--out", "o"], "develop": ["--config", "demo",
                                                                                        "--out", "o"],
            "report": ["run"], "latency profile": ["--out", "o"], "latency bundle": ["--out", "o"], "latency fit": ["--data", "d", "--out", "o"],
            "latency predict": ["--predictor", "p", "--arch", "a"], "latency check": ["--predictor", "p", "--arch", "a"]}


def _commands():
    for name, (_, parts, _) in COMMANDS.items():
        yield name, parts
    for name, (_, parts, _) in LATENCY_COMMANDS.items():
        yield f"latency {name}", parts
    from autotinybert.cli import _CORRELATE_PARTS, _SEARCH_PARTS

    yield "search", _SEARCH_PARTS
    yield "search correlate", _CORRELATE_PARTS


def test_every_option_has_a_doc_and_option_refuses_a_missing_doc():
    for cls in SETTINGS:
        for opt in options_of(cls):
            assert opt.spec.doc.strip() and len(opt.spec.doc.splitlines()) == 1, (cls.__name__, opt.name)
    with pytest.raises(TypeError, match="doc"):
        option(3)


@pytest.fixture
def required_paths(tmp_path, monkeypatch):
    """The paths REQUIRED names, existing (path options are checked where they are declared)."""
    monkeypatch.chdir(tmp_path)
    for folder in ("s", "m", "run"):
        (tmp_path / folder).mkdir()
    for file in ("c", "d", "p"):
        (tmp_path / file).write_text("text\n")


@pytest.mark.parametrize("command, parts", list(_commands()), ids=[c for c, _ in _commands()])
def test_cli_defaults_are_the_declared_defaults(command, parts, required_paths):
    args = build_parser().parse_args([*command.split(), *REQUIRED.get(command, [])])
    checked = 0
    for cls, kwargs in parts:
        prefix = kwargs.get("prefix", "")
        for opt in options_of(cls, include=kwargs.get("include"), exclude=kwargs.get("exclude", ())):
            if not opt.spec.cli or opt.default is MISSING:
                continue
            value = getattr(args, prefix + opt.field)
            if opt.spec.repeat and value is None:
                value = opt.default
            assert value == opt.default, (command, opt.name)
            checked += 1
        from_namespace(cls, args, prefix=prefix)  # and the defaults pass their own validation
    assert checked or command in ("report",)


def test_develop_sections_default_to_the_declared_defaults_and_never_declare_a_key_twice():
    config = validate_config({"search": {"range_fractions": [0.5]}})
    for section in SECTIONS:
        names = [o.name for o in section_options(section)]
        assert len(names) == len(set(names)), section
        for opt in section_options(section):
            expected = [0.5] if (section, opt.name) == ("search", "range_fractions") else opt.default
            assert as_plain(config[section][opt.name]) == as_plain(expected), (section, opt.name)


@pytest.mark.parametrize("name", ["demo", "cpu-small", "paper-mlm", "paper-kd"])
def test_shipped_configs_use_only_declared_keys_and_list_every_option(name):
    load_config(name, check_paths=False)  # unknown keys and bad values are errors (paths: the user's data)
    raw = yaml.safe_load(config_path(name).read_text())
    for section in SECTIONS:
        assert set(raw.get(section) or {}) == {o.name for o in section_options(section)}, (name, section)
    if name == "demo":  # the demo config documents every option in a comment
        lines = config_path(name).read_text().splitlines()
        for section in SECTIONS:
            start = lines.index(f"{section}:")
            for opt in section_options(section):
                at = next(i for i in range(start, len(lines)) if lines[i].strip().startswith(f"{opt.name}:"))
                assert "#" in lines[at] or lines[at - 1].strip().startswith("#"), (section, opt.name)


def _too_small(opt):
    """A value just outside the declared range, or None when the option has no lower bound."""
    if opt.spec.minimum is not None:
        return opt.spec.minimum - 1
    if opt.spec.above is not None:
        return opt.spec.above
    return None


@pytest.mark.parametrize("cls", SETTINGS, ids=[c.__name__ for c in SETTINGS])
def test_declared_bounds_and_choices_are_enforced(cls, tmp_path):
    required = {"out": "o", "corpus": ["c"], "supernet": tmp_path, "arch": "L1-H8-F8-A1-Q8", "data": tmp_path,
                "predictor": tmp_path, "archs": ["a"], "model": tmp_path, "config": "demo", "run_dir": tmp_path}
    base = {f.name: required[f.name] for f in dataclasses.fields(cls)
            if f.default is MISSING and f.default_factory is MISSING}
    cls(**base)
    for opt in options_of(cls):
        bad = _too_small(opt)
        if bad is not None:
            value = [bad] if opt.base in (list, tuple) else bad
            with pytest.raises(OptionError, match=opt.flag):
                cls(**{**base, opt.field: value})
        if opt.spec.choices:
            with pytest.raises(OptionError, match="must be one of"):
                cls(**{**base, opt.field: "no-such-choice"})


def test_yaml_type_errors_name_section_and_key():
    for raw, fragment in [({"pretrain": {"lr": "fast"}}, "pretrain.lr must be a number"),
                          ({"pretrain": {"bf16": 1}}, "pretrain.bf16 must be true or false"),
                          ({"search": {"target_ms": [3], "ft_batch_size": 0}}, "search.ft_batch_size must be at least 1"),
                          ({"latency": {"clock": "sundial"}}, "latency.clock must be one of wall, cpu")]:
        raw.setdefault("search", {}).setdefault("target_ms", [3])
        with pytest.raises(UserError, match=fragment.replace(".", r"\.")):
            validate_config(raw)


def test_prefixed_flags_are_named_as_typed(capsys, required_paths):
    code = main(["search", "--supernet", "s", "--predictor", "p", "--out", "o", "--ft-batch-size", "0"])
    assert code == 2 and "--ft-batch-size must be at least 1" in capsys.readouterr().err


def test_to_arguments_round_trips_every_kind_of_option(tmp_path, monkeypatch):
    import argparse

    monkeypatch.chdir(tmp_path)  # the paths exist: the command line checks them
    for name in ("a b", "c", "v"):
        (tmp_path / name).write_text("text\n")
    (tmp_path / "t").mkdir()

    settings = S.PretrainSettings(out="o", corpus=["a b", "c"], valid_corpus=["v"], max_layers=2, objective="kd",
                                  teacher="t", bf16=True, progress=False, lr=3e-4, warmup_ratio=0.0)
    parser = argparse.ArgumentParser()
    add_options(parser, S.PretrainSettings)
    assert from_namespace(S.PretrainSettings, parser.parse_args(to_arguments(settings))) == settings
    targets = S.TargetSettings(speedups=[2.0, 3.5], target_ms=[1.0])
    parser = argparse.ArgumentParser()
    add_options(parser, S.TargetSettings)
    assert to_arguments(targets) == ["--speedup", "2.0", "--speedup", "3.5", "--target-ms", "1.0"]
    assert from_namespace(S.TargetSettings, parser.parse_args(to_arguments(targets))) == targets


@pytest.mark.parametrize("cls", [S.PretrainSettings, S.ProxySettings])
def test_every_kd_teacher_option_takes_the_packaged_model_by_name(cls):
    """`pretrain --teacher` and the proxy's `--teacher` load the same Teacher: both accept
    builtin:all-minilm-l6-v2 (a path-only declaration refused it as 'no such folder')."""
    from autotinybert.options import path_problem

    teacher = next(o for o in options_of(cls) if o.name == "teacher")
    assert path_problem(teacher.spec, "builtin:all-minilm-l6-v2") is None


def test_resume_behaviour_is_part_of_the_declaration():
    """``option(resume="free")`` marks what may change on --resume; finetune's free arguments are
    derived from it (the same set as before it was declared)."""
    from autotinybert.options import resume_free, resume_invariant
    from autotinybert.pretrain import _RESUME_INVARIANT
    from autotinybert.tasks.run import _RESUME_FREE

    with pytest.raises(TypeError, match="resume="):
        option(1, "a number", resume="sometimes")
    assert _RESUME_FREE == {"command", "handler", "no_progress", "out", "resume", "overwrite", "threads", "device",
                            "progress"}
    assert _RESUME_INVARIANT == resume_invariant(S.PretrainSettings)
    assert not set(_RESUME_INVARIANT) & resume_free(S.PretrainSettings)
    assert {"max_steps", "progress", "log_every", "out"} <= resume_free(S.PretrainSettings)


def test_sequence_length_defaults_come_from_the_task():
    from autotinybert.tasks import glue, squad

    assert S.FinetuneSettings().sequence_length(glue.glue_task("sst2")) == 128
    assert S.FinetuneSettings().sequence_length(squad.squad_task("squad_v2")) == 384
    assert S.FinetuneSettings(max_seq_length=64).sequence_length(squad.squad_task("squad")) == 64
