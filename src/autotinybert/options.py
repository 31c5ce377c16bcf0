"""Options declared once: a typed dataclass field carries the type, default, doc and validation.

Everything else is derived from that one declaration:

* the ``autotinybert`` flags and ``--help`` (`add_options`, `from_namespace`);
* the sections and keys of a ``develop`` YAML config, with the same validation (`from_mapping`);
* the command line handed to ``torchrun`` (`to_arguments`).

Why not jsonargparse (what litgpt uses)? Its list and boolean syntax (``--task+ sst2``,
``--flag true``) would change every documented command (``--task sst2 --task mrpc``,
``--corpus a b``, ``--no-progress``), and its errors print the whole usage; the derivation here
is a short layer over the standard library's argparse that keeps the commands as they are.

An option's *name* is its flag without dashes and its YAML key (``lr`` → ``--lr``,
``pretrain.lr``); it defaults to the field name and can differ from it (`option(name=...)`).
"""

from __future__ import annotations

import argparse
import dataclasses
import operator
import os
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterable

from .errors import UserError

MISSING = dataclasses.MISSING


@dataclasses.dataclass(frozen=True)
class Spec:
    """What the declaration says about one option besides its type and default."""

    doc: str
    name: str | None = None            # YAML key (and flag); None: the field name
    flag: str | None = None            # the flag's stem when it differs from the name (--speedup vs speedups)
    positional: bool = False           # a positional argument instead of a flag
    choices: tuple | None = None
    minimum: float | None = None       # value >= minimum
    above: float | None = None         # value > above
    maximum: float | None = None       # value <= maximum
    below: float | None = None         # value < below
    repeat: bool = False               # lists: --flag A --flag B (default: --flag A B)
    negative: str | None = None        # booleans that default to true: the flag that turns them off
    metavar: str | None = None
    cli: bool = True                   # False: a config-file / library option only
    group: str | None = None           # --help group
    # Paths, checked where they are declared (`path_problem`): "dir" / "file" (must exist),
    # "source" (a file or folder, or hf:... / builtin:...), "out" (a folder to write: no file in
    # the way), "outfile" (a file to write: no folder in the way).
    path: str | None = None
    text: bool = False                 # an existing file must be UTF-8 text (checked on its first 64 KiB)
    keywords: tuple = ()               # names that are not paths (paper-mlm, demo, ...)
    check: Callable[[Any], str | None] | None = None  # a rule no keyword above says (e.g. task names)
    # On --resume of a training run (pretrain, finetune): "same" (the value must equal the recorded
    # one: it changes what is trained) or "free" (may change: progress, logging, threads, budget).
    resume: str = "same"


def option(default: Any = MISSING, doc: str = "", **spec: Any) -> Any:
    """A dataclass field declaring one option (see `Spec` for the keyword arguments)."""
    if not doc:
        raise TypeError("every option needs a one-line doc")
    if spec.get("path") not in (None, *PATH_KINDS):
        raise TypeError(f"path= must be one of {PATH_KINDS}")
    if spec.get("resume", "same") not in RESUME_KINDS:
        raise TypeError(f"resume= must be one of {RESUME_KINDS}")
    metadata = {"option": Spec(doc=doc, **spec)}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# --- introspection -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Opt:
    """One declared option of a dataclass, resolved (type hints evaluated)."""

    field: str
    name: str
    kind: Any          # the annotation with None removed, e.g. int, list[str], tuple[float, float]
    optional: bool     # None is allowed
    default: Any       # MISSING when required
    spec: Spec

    @property
    def flag(self) -> str:
        return "--" + (self.spec.flag or self.name).replace("_", "-")

    @property
    def base(self) -> type:
        return typing.get_origin(self.kind) or self.kind

    @property
    def item(self) -> type:
        args = typing.get_args(self.kind)
        return args[0] if args else str


def options_of(cls: type, *, include: Iterable[str] | None = None, exclude: Iterable[str] = ()) -> list[Opt]:
    """The declared options of ``cls`` (fields without `option` metadata are internal)."""
    hints = typing.get_type_hints(cls)
    keep = set(include) if include is not None else None
    found = []
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("option")
        if spec is None or f.name in exclude or (keep is not None and f.name not in keep):
            continue
        kind, optional = _strip_none(hints[f.name])
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else MISSING)
        found.append(Opt(f.name, spec.name or f.name, kind, optional, default, spec))
    return found


def resume_free(*classes: type) -> set[str]:
    """Fields of ``classes`` whose options may change between a run and its --resume
    (``option(resume="free")``); every other option must keep its recorded value."""
    return {opt.field for cls in classes for opt in options_of(cls) if opt.spec.resume == "free"}


def resume_invariant(cls: type) -> tuple[str, ...]:
    """Fields of ``cls`` whose options must keep their recorded value on --resume (the default)."""
    return tuple(opt.field for opt in options_of(cls) if opt.spec.resume != "free")


def _strip_none(hint: Any) -> tuple[Any, bool]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != len(typing.get_args(hint)):
            return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), True
    return hint, False


# --- validation --------------------------------------------------------------------------------
class OptionError(UserError):
    """A value an option's declaration rejects; `where` names it as the user wrote it."""

    def __init__(self, opt: Opt, problem: str, value: Any, where: str | None = None) -> None:
        self.opt, self.problem, self.value = opt, problem, value
        if isinstance(problem, PathProblem):  # "--model /x/y: no such folder"
            super().__init__(f"{where or opt.flag} {problem.path}: {problem}")
        else:
            super().__init__(f"{where or opt.flag} {problem}; got {value!r}")


class PathProblem(str):
    """What is wrong with one path of an option's value (the message names the path first)."""

    path: str

    def __new__(cls, path: Any, problem: str) -> "PathProblem":
        made = super().__new__(cls, problem)
        made.path = str(path)
        return made


PATH_KINDS = ("dir", "file", "source", "out", "outfile")
RESUME_KINDS = ("same", "free")
_NOUNS = {"dir": "folder", "file": "file", "source": "file or folder"}


def path_problem(spec: Spec, value: Any) -> PathProblem | None:
    """Why a path option's value cannot be used, or None (the one place paths are checked)."""
    text = str(value)
    if text in spec.keywords or (spec.path == "source" and text.startswith(("hf:", "builtin:"))):
        return None
    path = Path(text)
    if spec.path in ("out", "outfile"):
        want_dir = spec.path == "out"
        if path.exists() and path.is_dir() != want_dir:
            return PathProblem(text, "is a folder; give a file path" if path.is_dir() else
                               "is a file; give a folder path (new, empty, or a run to continue)")
        parent = path.absolute().parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            return PathProblem(text, f"cannot be created: {parent} is a file, not a folder")
        if not os.access(parent, os.W_OK | os.X_OK) and not path.exists():
            return PathProblem(text, f"cannot be created: {parent} is not writable")
        return None
    if not path.exists():
        hint = f" (or one of {', '.join(map(str, spec.keywords))})" if spec.keywords else ""
        return PathProblem(text, f"no such {_NOUNS[spec.path]}{hint}")
    if spec.path == "dir" and not path.is_dir():
        return PathProblem(text, "is a file; give a folder")
    if spec.path == "file" and not path.is_file():
        return PathProblem(text, "is a folder; give a file")
    if spec.text and path.is_file():
        return _text_problem(path)
    return None


def _text_problem(path: Path) -> PathProblem | None:
    try:
        with open(path, "rb") as handle:
            head = handle.read(65536)
    except OSError as err:
        return PathProblem(path, f"cannot be read ({err.strerror})")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 4 or len(head) < 65536:  # not just a character cut at the boundary
            return PathProblem(path, "is not UTF-8 text (a binary file or another encoding)")
    return None


def check_options(obj: Any, *, paths: bool = False) -> None:
    """Validate every declared option of a dataclass instance (called from ``__post_init__``).

    ``paths``: also check the declared paths against the file system. The command line and the
    develop config do (`from_namespace`, `check_mapping`): what a user typed must name what it
    says; a library caller may build settings for files that appear later.
    """
    for opt in options_of(type(obj)):
        problem = value_problem(opt, getattr(obj, opt.field), paths=paths)
        if problem:
            raise OptionError(opt, problem, getattr(obj, opt.field))


def value_problem(opt: Opt, value: Any, *, paths: bool = False) -> str | None:
    """Why ``value`` is not acceptable for ``opt`` (its paths too with ``paths``), or None."""
    if value is None:
        return None if opt.optional else "must be given"
    if opt.base in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return "must be a list"
        if opt.base is tuple and len(value) != len(typing.get_args(opt.kind)):
            return f"must be {len(typing.get_args(opt.kind))} values"
        return next((p for p in (_item_problem(opt, v, opt.item, paths) for v in value) if p), None)
    return _item_problem(opt, value, opt.kind, paths)


def _item_problem(opt: Opt, value: Any, kind: Any, paths: bool) -> str | None:
    problem = _scalar_problem(opt, value, kind)
    if problem is None and opt.spec.path and paths:
        return path_problem(opt.spec, value)
    if problem is None and opt.spec.check:
        return opt.spec.check(value)
    return problem


# The bounds an option may declare: the spec's field, how the rule reads, and the test a value passes.
BOUNDS = (("minimum", "at least", operator.ge), ("above", "greater than", operator.gt),
          ("maximum", "at most", operator.le), ("below", "less than", operator.lt))


def _scalar_problem(opt: Opt, value: Any, kind: Any) -> str | None:
    kinds = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)
    if not any(_is_kind(value, k) for k in kinds):
        return "must be " + " or ".join(_KIND_NAMES.get(k, getattr(k, "__name__", str(k))) for k in kinds)
    spec = opt.spec
    if spec.choices is not None and value not in spec.choices:
        return "must be one of " + ", ".join(map(str, spec.choices))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        for field, words, test in BOUNDS:
            bound = getattr(spec, field)
            if bound is not None and not test(value, bound):
                return f"must be {words} {bound:g}"
    return None


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", Path: "a path",
               dict: "a mapping"}


def _is_kind(value: Any, kind: Any) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False  # YAML's yes/no is not a number or a string
    if kind is float:
        return isinstance(value, (int, float))
    if kind is Path:
        return isinstance(value, (str, Path))
    if typing.get_origin(kind) is dict or kind is dict:
        return isinstance(value, dict)
    return isinstance(value, kind)


def _coerce(opt: Opt, value: Any) -> Any:
    """YAML gives ``1`` for a float option and strings for paths: convert to the declared type."""
    def one(v: Any, kind: Any) -> Any:
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            return float(v)
        if kind is Path and isinstance(v, str):
            return Path(v)
        return v

    if value is None:
        return None
    if opt.base in (list, tuple):
        return opt.base(one(v, opt.item) for v in value) if isinstance(value, (list, tuple)) else value
    return one(value, opt.kind)


# --- command line ------------------------------------------------------------------------------
def add_options(parser: argparse.ArgumentParser, cls: type, *, prefix: str = "", include: Iterable[str] | None = None,
                exclude: Iterable[str] = (), required: Iterable[str] = (), group: str | None = None) -> None:
    """Add a flag per declared option of ``cls``; ``prefix`` namespaces them (``ft_`` → ``--ft-lr``)."""
    groups: dict[str | None, Any] = {}
    must = set(required)
    for opt in options_of(cls, include=include, exclude=exclude):
        if not opt.spec.cli:
            continue
        title = group or opt.spec.group
        target = groups.setdefault(title, parser.add_argument_group(title) if title else parser)
        _add_flag(target, opt, prefix, opt.field in must or opt.default is MISSING)


def _add_flag(target: Any, opt: Opt, prefix: str, required: bool) -> None:
    dest = prefix + opt.field
    flag = "--" + (prefix + (opt.spec.flag or opt.name)).replace("_", "-")
    doc = _escaped(opt.spec.doc + _default_note(opt))
    if opt.spec.positional:
        target.add_argument(dest, type=_argparse_type(opt.kind), help=doc)
        return
    if opt.kind is bool:
        if opt.default is True:
            negative = "--" + prefix.replace("_", "-") + (opt.spec.negative or f"no-{opt.name}").replace("_", "-")
            target.add_argument(negative, dest=dest, action="store_false",
                                help=_escaped(f"{opt.spec.doc}: off (default on)"))
        else:
            target.add_argument(flag, dest=dest, action="store_true", help=doc)
        return
    metavar = opt.spec.metavar or ("{" + ",".join(map(str, opt.spec.choices)) + "}" if opt.spec.choices else None)
    kwargs: dict[str, Any] = {"dest": dest, "help": doc, "required": required, "metavar": metavar}
    convert = _argparse_type(opt.item if opt.base in (list, tuple) else opt.kind)
    if convert is not None:
        kwargs["type"] = convert
    if opt.base in (list, tuple):
        if opt.spec.repeat:
            kwargs.update(action="append", default=None)
        else:
            kwargs["nargs"] = len(typing.get_args(opt.kind)) if opt.base is tuple else "+"
    if "default" not in kwargs:
        kwargs["default"] = None if opt.default is MISSING else opt.default
    target.add_argument(flag, **kwargs)


def _escaped(doc: str) -> str:
    """argparse %-formats help text (``%(default)s``): a literal ``%`` in a doc must be doubled."""
    return doc.replace("%", "%%")


def _argparse_type(kind: Any) -> Callable[[str], Any] | None:
    if kind in (int, float, Path):
        return kind
    return None  # strings, and unions such as bool | str (validated after parsing)


def _default_note(opt: Opt) -> str:
    if opt.default in (MISSING, None, False, [], ()):
        return ""
    shown = " ".join(map(str, opt.default)) if isinstance(opt.default, (list, tuple)) else opt.default
    return f" (default {shown})"


def from_namespace(cls: type, args: argparse.Namespace, *, prefix: str = "", **fixed: Any) -> Any:
    """An instance of ``cls`` from parsed flags (added by `add_options` with the same prefix);
    options without a flag keep their default unless given in ``fixed``."""
    values = {}
    for opt in options_of(cls):
        if opt.field in fixed:
            continue
        if hasattr(args, prefix + opt.field):
            value = getattr(args, prefix + opt.field)
            if opt.spec.repeat and value is None:  # argparse's append starts from None
                value = opt.default if opt.default is not MISSING else []
            values[opt.field] = value
    try:
        made = cls(**values, **fixed)
        check_options(made, paths=True)
        return made
    except OptionError as err:
        if prefix:  # name the flag as the user typed it
            typed = "--" + (prefix + (err.opt.spec.flag or err.opt.name)).replace("_", "-")
            raise UserError(str(err).replace(err.opt.flag, typed, 1)) from None
        raise


def to_arguments(obj: Any, *, exclude: Iterable[str] = ()) -> list[str]:
    """The flags that rebuild ``obj`` through `add_options` / `from_namespace` (non-default values)."""
    args: list[str] = []
    for opt in options_of(type(obj), exclude=exclude):
        value = getattr(obj, opt.field)
        if not opt.spec.cli or value == opt.default or value is None:
            continue
        if opt.kind is bool:
            negative = "--" + (opt.spec.negative or f"no-{opt.name}").replace("_", "-")
            args.append(opt.flag if value else negative)
        elif opt.base in (list, tuple):
            items = [str(v) for v in value]
            args += [tok for v in items for tok in (opt.flag, v)] if opt.spec.repeat else [opt.flag, *items]
        else:
            args += [opt.flag, str(value)]
    return args


# --- config files ------------------------------------------------------------------------------
def check_mapping(opts: list[Opt], given: dict[str, Any], where: str, *, paths: bool = True) -> dict[str, Any]:
    """Type-check and validate ``{name: value}`` (from YAML) against ``opts``; fill defaults.

    Returns ``{name: value}`` with every option present. Unknown keys are the caller's business.
    """
    values = {}
    for opt in opts:
        value = _coerce(opt, given[opt.name]) if opt.name in given else opt.default
        if value is MISSING:
            raise UserError(f"{where}: {opt.name} is required ({opt.spec.doc})")
        problem = value_problem(opt, value, paths=paths)
        if problem:
            raise OptionError(opt, problem, value, where=f"{where}.{opt.name}")
        values[opt.name] = value
    return values


def build(cls: type, values: dict[str, Any], **fixed: Any) -> Any:
    """An instance of ``cls`` from ``{name: value}`` (option names, as in YAML) plus ``fixed`` fields."""
    by_name = {opt.name: opt.field for opt in options_of(cls)}
    return cls(**{by_name[k]: v for k, v in values.items() if k in by_name and by_name[k] not in fixed}, **fixed)


def as_plain(value: Any) -> Any:
    """A YAML/JSON-friendly copy (paths as strings, tuples as lists)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [as_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: as_plain(v) for k, v in value.items()}
    return value
