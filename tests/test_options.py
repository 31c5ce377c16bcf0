"""Each option is declared once (settings.py); the CLI, develop's YAML and torchrun agree with it."""

import contextlib
import dataclasses
import importlib.util
import inspect

import pytest
import yaml

from conftest import REPO

from autotinybert import settings as S
from autotinybert.cli import COMMANDS, LATENCY_COMMANDS, build_parser, main
from autotinybert.develop.config import (SECTIONS, config_path, develop_settings, load_config, render_config,
                                         section_options, validate_config)
from autotinybert.errors import UserError
from autotinybert.options import MISSING, as_plain, OptionError, add_options, from_namespace, option, options_of, to_arguments

SETTINGS = [cls for _, cls in inspect.getmembers(S, inspect.isclass)
            if dataclasses.is_dataclass(cls) and cls.__module__ == S.__name__ and options_of(cls)]
# Required values for commands whose flags are mandatory (everything else stays at its default).
REQUIRED = {"pretrain": ["--out", "o", "--corpus", "c"], "extract": ["--supernet", "s", "--arch", "L1-H8-F8-A1-Q8",
                                                                     "--out", "o"],
            "init": ["--out", "o"], "finetune": ["--model", "m", "--out", "o"],  # develop: --print-config needs none
            "report": ["run"], "latency profile": ["--out", "o"], "latency bundle": ["--out", "o"], "latency fit": ["--data", "d", "--out", "o"],
            "latency predict": ["--predictor", "p", "--arch", "a"], "latency check": ["--predictor", "p", "--arch", "a"],
            "latency compare": ["--model", "m", "--reference", "m"]}


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


@pytest.mark.parametrize("name", S.BUILTIN_CONFIGS)
def test_every_config_key_reaches_the_stages_typed_settings(name):
    """The stages read `DevelopSettings`: each key of each section lands, with its value, on the
    typed settings field its part declares (a part left out, or a key mapped to another field, fails)."""
    config = load_config(name, check_paths=False)
    settings = develop_settings(config)
    for section, parts in SECTIONS.items():
        for part in parts:
            typed = getattr(settings, part.attribute)
            assert isinstance(typed, part.cls), part.attribute
            by_name = {opt.name: opt.field for opt in options_of(part.cls)}
            for opt in part.options():
                given = config[section][opt.name]
                if given is None:  # the class fills it (generations by method, a teacher the pipeline names)
                    continue
                value = getattr(typed, by_name[opt.name[len(part.prefix):]])
                assert as_plain(value) == as_plain(given), (section, opt.name)


def _key_line(lines, section, key):
    """The index of ``key:`` in ``section`` of a YAML text's lines."""
    start = lines.index(f"{section}:")
    return next(i for i in range(start + 1, len(lines)) if lines[i].strip().startswith(f"{key}:"))


@pytest.mark.parametrize("name", S.BUILTIN_CONFIGS)
def test_shipped_configs_list_only_what_they_change_each_with_why(name):
    """A shipped config states only the options whose value differs from the declared default,
    each with a comment saying why: a key restating its default is an error (nothing copied can
    drift); every option with its doc is in the generated configuration instead."""
    config = load_config(name, check_paths=False)  # unknown keys and bad values are errors (paths: the user's data)
    text = config_path(name).read_text(encoding="utf-8")
    lines = text.splitlines()
    for section, given in (yaml.safe_load(text) or {}).items():
        defaults = {o.name: o.default for o in section_options(section)}
        for key in given or {}:
            assert as_plain(config[section][key]) != as_plain(defaults[key]), \
                f"{name}.yaml: {section}.{key} restates its declared default; drop it"
            at = _key_line(lines, section, key)
            assert " #" in lines[at] or lines[at - 1].strip().startswith("#"), \
                f"{name}.yaml: {section}.{key} needs a comment saying why it differs from the default"


def test_the_generated_config_lists_every_option_with_its_doc_and_loads_back(tmp_path):
    """`render_config` (develop --print-config, docs/config-reference.md): every option of every
    section, its declared doc in the comment above it, its default; a config printed in full loads
    back to the same configuration."""
    text = render_config()
    lines = text.splitlines()
    assert yaml.safe_load(text) == {s: {o.name: as_plain(o.default) for o in section_options(s)} for s in SECTIONS}
    for section in SECTIONS:
        for opt in section_options(section):
            at = _key_line(lines, section, opt.name)
            above = at
            while lines[above - 1].startswith("  #"):
                above -= 1
            comment = " ".join(line.strip()[1:].strip() for line in lines[above:at])
            assert comment == " ".join(opt.spec.doc.split()), (section, opt.name)
            if opt.spec.choices:
                assert "# one of " in lines[at], (section, opt.name)
    for name in S.BUILTIN_CONFIGS:
        config = load_config(name, check_paths=False)
        (tmp_path / f"{name}.yaml").write_text(render_config(config, name), encoding="utf-8")
        assert load_config(tmp_path / f"{name}.yaml", check_paths=False) == config, name


def test_develop_print_config_prints_the_generated_config_and_runs_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["develop", "--print-config"]) == 0
    assert capsys.readouterr().out == render_config()
    assert main(["develop", "--print-config", "--config", "demo", "--set", "search.method=random"]) == 0
    printed = capsys.readouterr().out
    assert printed == render_config(load_config("demo", ["search.method=random"]), "demo")
    assert "  method: random  # one of random, fast, evolved; default: evolved" in printed.splitlines()
    assert list(tmp_path.iterdir()) == []
    assert main(["develop", "--config", "demo"]) == 2  # running needs --out
    assert "develop needs --config" in capsys.readouterr().err


_SPEC = importlib.util.spec_from_file_location("config_reference", REPO / "tools" / "config_reference.py")
config_reference = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(config_reference)


def test_docs_config_reference_is_up_to_date():
    written = (REPO / "docs" / "config-reference.md").read_text(encoding="utf-8")
    assert written == config_reference.render(), \
        "docs/config-reference.md is out of date: run python tools/config_reference.py"


@contextlib.contextmanager
def _declared(cls, **fields):
    """``cls`` as if its class statement in settings.py declared more fields (``name=(annotation,
    option(...))``): the same class object, re-made by the same decorator, so everything derived
    from it (the commands' flags, develop's sections, the resume rules) sees the new options as it
    would see ones written there. The class is restored afterwards."""
    saved = dict(vars(cls))
    own = cls.__annotations__
    try:
        for f in dataclasses.fields(cls):  # the declarations as the class statement wrote them
            if f.name in own:
                setattr(cls, f.name, f)
        cls.__annotations__ = {**own, **{name: annotation for name, (annotation, _) in fields.items()}}
        for name, (_, field) in fields.items():
            setattr(cls, name, field)
        for generated in ("__init__", "__repr__", "__eq__", "__match_args__"):  # the decorator adds only missing ones
            if generated in vars(cls):
                delattr(cls, generated)
        dataclasses.dataclass(cls)
        yield cls
    finally:
        for key in set(vars(cls)) - set(saved):
            delattr(cls, key)
        for key, value in saved.items():
            if vars(cls).get(key) is not value:
                setattr(cls, key, value)


def test_adding_an_option_touches_one_file(capsys, required_paths, tmp_path):
    """Two options declared on `PretrainSettings` at test time, and nothing else: the `pretrain`
    flags and --help, develop's `pretrain` section (defaults, validation, the generated config),
    the torchrun command line and the --resume rules all have them."""
    fields = {"test_only_steps": ("int", option(7, "a throwaway option declared by a test", minimum=1)),
              "test_only_ratio": ("float", option(0.5, "another, free on --resume", maximum=1, resume="free"))}
    with _declared(S.PretrainSettings, **fields):
        with pytest.raises(SystemExit):
            main(["pretrain", "--help"])
        usage = " ".join(capsys.readouterr().out.split())
        assert "--test-only-steps TEST_ONLY_STEPS a throwaway option declared by a test (default 7)" in usage
        args = build_parser().parse_args(["pretrain", *REQUIRED["pretrain"], "--test-only-steps", "3"])
        settings = from_namespace(S.PretrainSettings, args)
        assert (settings.test_only_steps, settings.test_only_ratio) == (3, 0.5)
        assert to_arguments(settings)[-2:] == ["--test-only-steps", "3"]  # what torchrun is handed

        path = tmp_path / "config.yaml"
        path.write_text("search: {speedups: [2]}\npretrain: {test_only_steps: 4}\n")
        config = load_config(path, check_paths=False)
        assert (config["pretrain"]["test_only_steps"], config["pretrain"]["test_only_ratio"]) == (4, 0.5)
        assert develop_settings(config).pretraining.test_only_steps == 4  # what the pretrain stage reads
        with pytest.raises(UserError, match=r"pretrain\.test_only_steps must be at least 1"):
            load_config(path, ["pretrain.test_only_steps=0"], check_paths=False)
        lines = render_config().splitlines()
        at = _key_line(lines, "pretrain", "test_only_steps")
        assert lines[at - 1:at + 1] == ["  # a throwaway option declared by a test", "  test_only_steps: 7  # at least 1"]

        from autotinybert.options import resume_free, resume_invariant

        assert "test_only_steps" in resume_invariant(S.PretrainSettings)
        assert "test_only_ratio" in resume_free(S.PretrainSettings)
    assert "test_only_steps" not in {f.name for f in dataclasses.fields(S.PretrainSettings)}
    assert "--test-only-steps" not in to_arguments(S.PretrainSettings(out="o", corpus=["c"], max_steps=2))


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
                "predictor": tmp_path, "archs": ["a"], "model": tmp_path, "config": "demo", "run_dir": tmp_path,
                "models": [str(tmp_path)], "reference": str(tmp_path)}
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
            value = ["no-such-choice"] if opt.base in (list, tuple) else "no-such-choice"
            with pytest.raises(OptionError, match="must be one of"):
                cls(**{**base, opt.field: value})


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
