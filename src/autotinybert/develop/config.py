"""The ``develop`` config: one YAML mapping of sections, each derived from the stages' settings.

A section lists options of one or more dataclasses of `settings` (`Part`): the options a stage's
own command takes, minus those the pipeline provides itself (paths between stages, the run's
seed), plus a few pipeline-only ones (``reuse``, ``nproc_per_node``, ...). Keys, types,
defaults, docs and validation all come from those declarations; nothing is declared here.
"""

from __future__ import annotations

import dataclasses
import typing
from importlib import resources
from pathlib import Path
from typing import Any

from .. import settings as S
from ..errors import UserError, reading
from ..options import BOUNDS, Opt, as_plain, build, check_mapping, options_of

BUILTIN_CONFIGS = S.BUILTIN_CONFIGS


@dataclasses.dataclass(frozen=True)
class Part:
    """The options of ``cls`` a section takes (YAML keys = option names, with ``prefix``), held as
    `DevelopSettings`' field ``attribute``."""

    cls: type
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    prefix: str = ""
    attribute: str = ""

    def options(self) -> list[Opt]:
        return [dataclasses.replace(o, name=self.prefix + o.name)
                for o in options_of(self.cls, include=self.include, exclude=self.exclude) if o.spec.cli]

    def build(self, section: dict[str, Any], **fixed: Any) -> Any:
        """An instance of ``cls`` from a validated section (plus pipeline-provided ``fixed`` fields)."""
        mine = {o.name[len(self.prefix):]: section[o.name] for o in self.options()}
        return build(self.cls, mine, **fixed)


def part(section: str, *, include: tuple[str, ...] | None = None, exclude: tuple[str, ...] = (),
         prefix: str = "") -> Any:
    """A `DevelopSettings` field: the options of its annotated class that config section ``section`` takes."""
    return dataclasses.field(metadata={"section": section, "include": include, "exclude": exclude, "prefix": prefix})


# Fields the pipeline fills in itself (paths between stages, the run's seed and progress).
PRETRAIN_PROVIDED = ("out", "corpus", "valid_corpus", "cache_dir", "seed", "progress", "arch", "init",
                     "trust_remote_code")
# The task route's distillation: the task SuperPLM's and the final recipe's, then the final recipe's
# alone (the teacher's own fine-tuning has no teacher); the pipeline's own fine-tuning has no teacher.
FINAL_RECIPE_ONLY = ("kd_hidden", "augment_copies", "augment_rate")
FINAL_DISTILLATION = ("kd_alpha", "kd_temperature", *FINAL_RECIPE_ONLY)
FURTHER_TRAIN = ("objective", "teacher", "batch_size", "grad_accum", "lr", "weight_decay", "warmup_ratio",
                 "max_grad_norm", "bf16", "log_every", "eval_every", "eval_batches", "save_every")


@dataclasses.dataclass(frozen=True)
class DevelopSettings:
    """The validated config as the typed settings the stages read (`develop_settings`); the config
    sections and their keys are derived from these fields (`SECTIONS`), in this order.

    Required fields that only the pipeline knows (paths between stages) hold `PENDING` placeholders
    until a stage fills them in with `dataclasses.replace`."""

    run: S.RunOptions = part("run")
    data: S.DataOptions = part("data")
    pretrain: S.PretrainStage = part("pretrain")
    # A pre-trained start (`init --from`): pretrain.init_from, init_mode, ...; the calibration text is the corpus.
    start: S.InitSettings = part("pretrain", include=("source", "mode", "importance", "calibration_sequences",
                                                      "calibration_seq_len"), prefix="init_")
    pretraining: S.PretrainSettings = part("pretrain", exclude=PRETRAIN_PROVIDED)
    latency: S.LatencyStage = part("latency")
    timing: S.LatencySettings = part("latency")
    profile: S.ProfileSettings = part("latency")
    fit: S.FitSettings = part("latency")
    search: S.SearchStage = part("search")
    search_command: S.SearchCommand = part("search", include=("evaluator", "workers"))
    targets: S.TargetSettings = part("search")
    search_method: S.SearchSettings = part("search", exclude=("seed",))
    proxy: S.ProxySettings = part("search", exclude=("trust_remote_code",))
    search_budget: S.FinetuneBudget = part("search", prefix="ft_")
    task_evaluator: S.TaskEvaluatorSettings = part("search", include=("rerank",))
    extract: S.ExtractStage = part("extract")
    export: S.ExtractSettings = part("extract", include=("onnx_optimize", "onnx_int8", "verify"))
    further_train: S.FurtherTrainStage = part("further_train")
    further_training: S.PretrainSettings = part("further_train", include=FURTHER_TRAIN)
    task_data: S.TaskDataSettings = part("finetune", include=("tasks",))
    finetune: S.FinetuneStage = part("finetune")
    # No teacher in the pipeline's fine-tuning: its distillation options do not apply; run.device is its device.
    finetuning: S.FinetuneSettings = part("finetune", exclude=("progress", "device", *FINAL_DISTILLATION))
    # The task route: its switch and teacher, how the task SuperPLM is built, its training budget
    # (superplm_*), and the distillation strength of that training and of the final recipe.
    task: S.TaskRouteStage = part("task")
    task_superplm: S.TaskSuperPLMSettings = part("task", exclude=("seed",))
    task_budget: S.FinetuneSettings = part("task", include=("epochs", "max_steps", "learning_rate",
                                                            "max_train_examples"), prefix="superplm_")
    distillation: S.FinetuneSettings = part("task", include=FINAL_DISTILLATION)
    report: S.ReportStage = part("report")


def _sections() -> dict[str, tuple[Part, ...]]:
    hints = typing.get_type_hints(DevelopSettings)
    sections: dict[str, list[Part]] = {}
    for f in dataclasses.fields(DevelopSettings):
        m = f.metadata
        sections.setdefault(m["section"], []).append(Part(hints[f.name], m["include"], m["exclude"], m["prefix"],
                                                          f.name))
    return {name: tuple(parts) for name, parts in sections.items()}


SECTIONS: dict[str, tuple[Part, ...]] = _sections()
# What the pipeline provides later, as placeholders: required fields have no default.
SOURCE_TEACHER = "<pretrain.init_from>"  # a teacher not named, with a pre-trained start: the source teaches
SOURCE_TAUGHT = (S.PretrainSettings, S.ProxySettings)  # the settings whose teacher defaults to the source
PENDING = {S.PretrainSettings: {"out": "<run>", "corpus": [S.BUILTIN_CORPUS]}, S.InitSettings: {"out": Path("<run>")},
           S.ExtractSettings: {"supernet": Path("<pretrain>"), "arch": "<search>", "out": Path("<run>")}}


def develop_settings(config: dict[str, dict[str, Any]], source: str = "config") -> DevelopSettings:
    """Every `DevelopSettings` field built from a validated config (rules between options checked,
    each named as a key of the file)."""
    return DevelopSettings(**{part.attribute: _build_part(part, section, config, source)
                              for section, parts in SECTIONS.items() for part in parts})


def _build_part(part: Part, section: str, config: dict[str, dict[str, Any]], source: str) -> Any:
    values = config[section]
    pending = dict(PENDING.get(part.cls, {}))
    if part.cls in SOURCE_TAUGHT and not values.get("teacher") and config["pretrain"]["init_from"]:
        pending["teacher"] = SOURCE_TEACHER
    try:
        return part.build(values, **pending)
    except UserError as err:  # a rule between options: name them as keys of this file
        message = str(err)
        for opt in sorted(part.options(), key=lambda o: -len(o.flag)):
            message = message.replace(opt.flag, f"{section}.{opt.name}")
        raise UserError(f"{source}: {message}") from None


# Keys of earlier versions, with the advice that replaces them.
_RENAMED = {("pretrain", "limits"): "use pretrain.max_layers, max_hidden, max_ffn, max_heads, max_qkv"}


def section_options(section: str) -> list[Opt]:
    return [opt for part in SECTIONS[section] for opt in part.options()]


def config_path(name_or_path: str | Path) -> Path:
    """A shipped config by name (``demo``) or a YAML file path."""
    text = str(name_or_path)
    if text in BUILTIN_CONFIGS:
        return Path(str(resources.files("autotinybert") / "configs" / f"{text}.yaml"))
    path = Path(text)
    if not path.is_file():
        raise UserError(f"--config {text}: no such file; give a YAML path or one of {', '.join(BUILTIN_CONFIGS)}")
    return path


def load_config(name_or_path: str | Path, overrides: list[str] | None = None, *,
                check_paths: bool = True) -> dict[str, dict[str, Any]]:
    """Read, apply ``section.key=value`` overrides, fill defaults and validate (with
    ``check_paths``: every path it names must exist, before a run touches anything)."""
    import yaml

    path = config_path(name_or_path)
    with reading(path, "--config", "fix the file"):
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise UserError(f"{path} must be a mapping of sections ({', '.join(SECTIONS)})")
    for item in overrides or []:
        _apply_override(raw, item)
    return validate_config(raw, str(path), check_paths=check_paths)


def _apply_override(raw: dict, item: str) -> None:
    import yaml

    key, sep, value = item.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not name:
        raise UserError(f"--set {item!r}: write SECTION.KEY=VALUE, e.g. --set pretrain.max_steps=50")
    if not isinstance(raw.get(section, {}), dict):
        raise UserError(f"--set {item!r}: section {section!r} is not a mapping in the config")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as err:
        raise UserError(f"--set {item!r}: the value is not valid YAML ({str(err).splitlines()[0]})") from None
    raw.setdefault(section, {})[name] = parsed


def validate_config(raw: dict, source: str = "config", *, check_paths: bool = True) -> dict[str, dict[str, Any]]:
    """Every section with every option (defaults filled in), or a `UserError` naming the key."""
    for section in raw:
        if section not in SECTIONS:
            raise UserError(f"{source}: unknown section {section!r}; use {', '.join(SECTIONS)}")
    config = {section: _validate_section(raw, section, source, check_paths) for section in SECTIONS}
    develop_settings(config, source)  # the rules between options of one settings class
    _check_across_sections(config, source)
    return config


def _validate_section(raw: dict, section: str, source: str, check_paths: bool) -> dict[str, Any]:
    given = raw.get(section) or {}
    if not isinstance(given, dict):
        raise UserError(f"{source}: {section} must be a mapping of options, got {type(given).__name__}")
    opts = section_options(section)
    known = {o.name for o in opts}
    for key in given:
        if key not in known:
            advice = _RENAMED.get((section, key), f"known: {', '.join(sorted(known))}")
            raise UserError(f"{source}: unknown option {section}.{key}; {advice}")
    return check_mapping(opts, given, f"{source}: {section}", paths=check_paths)


def _check_across_sections(config: dict, source: str) -> None:
    search = config["search"]
    if not (search["speedups"] or search["target_ms"] or search["range_fractions"] or search["source_speedups"]):
        raise UserError(f"{source}: give at least one target in search.speedups, search.target_ms, "
                        "search.range_fractions or search.source_speedups")
    if search["source_speedups"] and not config["pretrain"]["init_from"]:
        raise UserError(f"{source}: search.source_speedups are relative to pretrain.init_from; set it or use "
                        "search.speedups (relative to BERT-base)")
    if config["latency"]["form"] == "auto" and config["latency"]["reuse"]:
        raise UserError(f"{source}: latency.form auto profiles every deployed form, latency.reuse brings one "
                        "predictor: drop latency.reuse or set latency.form: configured")
    if config["task"]["enabled"]:
        _check_task_route(config, source)
    elif search["evaluator"] == "task":
        raise UserError(f"{source}: search.evaluator task scores the task route's SuperPLM; set task.enabled: true")
    if search["evaluator"] == "finetune" and not config["finetune"]["tasks"]:
        raise UserError(f"{source}: search.evaluator finetune fine-tunes on finetune.tasks; list at least one task")
    for key in ("corpus", "valid_corpus"):
        for value in config["data"][key] or []:
            if value.startswith("builtin:") and value != S.BUILTIN_CORPUS:
                raise UserError(f"{source}: data.{key}: unknown built-in corpus {value!r}; use {S.BUILTIN_CORPUS}")
    tasks_dir = config["data"]["tasks_dir"]
    if tasks_dir and tasks_dir.startswith("builtin:") and tasks_dir != S.BUILTIN_TASK:
        raise UserError(f"{source}: data.tasks_dir: unknown built-in task {tasks_dir!r}; use {S.BUILTIN_TASK}")


def _check_task_route(config: dict, source: str) -> None:
    """What the task route needs from the other sections."""
    tasks = config["finetune"]["tasks"]
    if len(tasks) != 1:
        raise UserError(f"{source}: the task route makes one task's model: list exactly one task in finetune.tasks")
    if not (config["pretrain"]["init_from"] or config["task"]["teacher"]):
        raise UserError(f"{source}: the task route starts from a pre-trained source: set pretrain.init_from (or "
                        "task.teacher, a model fine-tuned on the task)")
    if config["pretrain"]["init_mode"] != config["task"]["mode"]:
        raise UserError(f"{source}: the latency stage profiles pretrain.init_mode's space: set task.mode to the same "
                        f"({config['pretrain']['init_mode']})")
    if not config["finetune"]["validation_examples"]:
        raise UserError(f"{source}: the task route selects on rows carved from train, never on dev: set "
                        "finetune.validation_examples (e.g. 1000)")
    if config["search"]["evaluator"] not in ("task", "finetune"):
        raise UserError(f"{source}: the task route's SuperPLM has a task head, not an MLM head: set "
                        "search.evaluator: task")


def render_config(config: dict[str, dict[str, Any]] | None = None, source: str | None = None) -> str:
    """The full configuration as commented YAML, generated from the declarations: every section,
    every option with its value, its declared doc and its declared bounds / choices.

    ``config`` (a `load_config` result; None: the declared defaults) gives the values, and a value
    that differs from the declared default says so; ``source`` names it in the heading. The text
    loads back (`load_config`) to the same configuration. The shipped configs list only what they
    change: this is where every option and its doc is written out, so nothing copied can drift.
    """
    import textwrap

    if config is None:
        heading = ("autotinybert develop: every option of every section with its declared default and doc, generated "
                   "from the declarations (src/autotinybert/settings.py) by `autotinybert develop --print-config`. A "
                   "config file lists only what it changes (a run needs at least one target, e.g. search.speedups); "
                   "--set SECTION.KEY=VALUE changes one option.")
    else:
        heading = (f"autotinybert develop: the full configuration of {source or 'a config'}, generated from the "
                   f"declarations by `autotinybert develop --print-config --config {source or 'FILE'}`: every option "
                   "with its value (over the declared defaults; '# default: ...' marks each value changed) and its "
                   "declared doc.")
    lines = textwrap.wrap(heading, width=100, initial_indent="# ", subsequent_indent="# ", break_long_words=False,
                          break_on_hyphens=False)
    for section in SECTIONS:
        lines += ["", f"{section}:"]
        for opt in section_options(section):
            value = opt.default if config is None else config[section][opt.name]
            lines += textwrap.wrap(opt.spec.doc, width=100, initial_indent="  # ", subsequent_indent="  # ",
                                   break_long_words=False, break_on_hyphens=False)
            notes = _declared_rules(opt)
            if config is not None and as_plain(value) != as_plain(opt.default):
                notes.append(f"default: {_yaml_value(opt.default)}")
            lines.append(f"  {opt.name}: {_yaml_value(value)}" + (f"  # {'; '.join(notes)}" if notes else ""))
    return "\n".join(lines) + "\n"


def _declared_rules(opt: Opt) -> list[str]:
    """What the declaration accepts besides the type: ``one of a, b``, ``at least 1``, ..."""
    spec = opt.spec
    rules = ["one of " + ", ".join(_yaml_value(c) for c in spec.choices)] if spec.choices else []
    for field, words, _ in BOUNDS:
        if getattr(spec, field) is not None:
            rules.append(f"{words} {getattr(spec, field):g}")
    return rules


def _yaml_value(value: Any) -> str:
    """One value in YAML flow style, on one line (what ``key: value`` needs)."""
    import yaml

    text = yaml.safe_dump(as_plain(value), default_flow_style=True, width=float("inf")).strip()
    return text.removesuffix("\n...").strip()


def write_resolved_config(out: Path, config: dict) -> None:
    import yaml

    from ..files import atomic_write_text

    atomic_write_text(Path(out) / "config.yaml", yaml.safe_dump(as_plain(config), sort_keys=False))
