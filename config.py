"""The project's one config module: a script's @dataclass becomes its command line, optionally fed by a YAML/JSON file.

    cfg, given = parse(TrainConfig)             # --batch-size for batch_size, --x/--no-x for a bool, --config FILE

Field `batch_size: int = 128  # images per step` gives `--batch-size BATCH_SIZE` with help "images per step [128]".
Precedence: the dataclass's defaults < the --config file < flags on the command line; `given` names the fields that
came from the file or the command line. Optional ClassVars on the dataclass drive `check`, the one place where
values are validated (every script gets it through `parse`; a `main(cfg)` called directly calls it itself):

    CHOICES: ClassVar[dict[str, tuple]] = {"loader": ("dali", "torch")}      # the value must be one of these
    BOUNDS: ClassVar[dict[str, str]] = {"batch_size": ">= 1", "p": "0..1"}     # >= x, > x, <= x, < x, a..b, a.., ..b
    REQUIRED: ClassVar[tuple[str, ...]] = ("data",)                           # non-empty strings
    RETIRED: ClassVar[tuple[str, ...]] = ("old_field",)                       # keys a config file may still carry

It also holds the project's one error type for users: every error a user can cause (a flag, a config file, a missing
or damaged input, the data) derives from `UserError`, and each script's entry point runs its `main` inside
`user_errors()`, which turns exactly those, and the OS errors of files (missing, unreadable, disk full), into one line
`error: ...` and exit status 1. Anything else is a bug and keeps its traceback.

    if __name__ == "__main__":
        with config.user_errors():
            main(config.parse(SampleConfig)[0])

Importing this module loads neither torch nor yaml (yaml only when a YAML file is read), so tests and tools can use it.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import inspect
import io
import json
import math
import re
import sys
import tokenize
import typing
from pathlib import Path
from typing import Any, Callable, Iterator

TYPES = (str, int, float, bool)  # field types a flag can carry


class UserError(Exception):
    """An error the user caused and can fix (a flag, a file, the data); its message is the one line shown, naming the
    flag or file. Every project error class derives from it; an entry point's `user_errors()` shows nothing else as
    one line."""


class ConfigError(UserError, ValueError):
    """A value or config file that cannot be used; the message is one line naming the flag (and the file)."""


def one_line(e: BaseException) -> str:
    """An error as one line: a UserError's own message; an OS error as 'FILE: what went wrong' (or the message it was
    raised with); otherwise 'Type: message'. Whitespace (a traceback carried in a message, a wrapped line) is folded
    to single spaces."""
    if isinstance(e, OSError) and e.strerror:
        files = [str(f) for f in (e.filename, e.filename2) if f is not None]
        text = f"{' -> '.join(files)}: {e.strerror}" if files else e.strerror
    else:
        text = str(e)
        if not isinstance(e, (UserError, OSError)):
            text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return " ".join(text.split()) or type(e).__name__


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """An entry point's guard: a UserError or an OSError becomes `error: <one line>` on stderr and exit status 1;
    any other exception is a bug and propagates with its traceback."""
    try:
        yield
    except (UserError, OSError) as e:
        raise SystemExit(f"error: {one_line(e)}") from None


def flag(name: str) -> str:
    """The command-line spelling of a field: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


def field_comments(cls: type) -> dict[str, str]:
    """The `# comment` after each field in a dataclass's source (the flag's help); {} when the source is unavailable."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    # tokenize, not a regex over lines, so that a '#' inside a default string is not taken for a comment.
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    names = {f.name for f in dataclasses.fields(cls)}
    found = {}
    for lineno, line in enumerate(source.splitlines(), 1):
        m = re.match(r"\s+(\w+)\s*:", line)
        if m and m.group(1) in names and lineno in comments:
            found[m.group(1)] = comments[lineno]
    return found


# ---------------------------------------------------------------------------------------------------- the dataclass

def _field_types(cls: type) -> dict[str, type]:
    """Each field's type, from the annotations (strings under `from __future__ import annotations`)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    types = {}
    for f in dataclasses.fields(cls):
        if hints.get(f.name) not in TYPES:
            raise TypeError(f"{cls.__name__}.{f.name}: type {hints.get(f.name)!r} is not one of str, int, float, bool")
        if f.default is dataclasses.MISSING:
            raise TypeError(f"{cls.__name__}.{f.name}: a config field needs a default")
        types[f.name] = hints[f.name]
    return types


def _bound(spec: str) -> list[tuple[Callable[[float], bool], str]]:
    """'>= 1', '> 0', '<= 1', '< 5', '0..1' (inclusive), '-1..', '..5', or several joined by ',': tests and words."""
    parts = []
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(>=|>|<=|<)\s*(\S+)", part)
        r = re.fullmatch(r"(\S*?)\s*\.\.\s*(\S*)", part)
        try:
            if m:
                op, x = m.group(1), float(m.group(2))
                test = {">=": lambda v, x=x: v >= x, ">": lambda v, x=x: v > x,
                        "<=": lambda v, x=x: v <= x, "<": lambda v, x=x: v < x}[op]
                parts.append((test, f"{op} {m.group(2)}"))
            elif r and (r.group(1) or r.group(2)):
                lo, hi = r.group(1), r.group(2)
                if lo:
                    parts.append((lambda v, x=float(lo): v >= x, f">= {lo}" if not hi else f"in {lo}..{hi}"))
                if hi:
                    parts.append((lambda v, x=float(hi): v <= x, f"<= {hi}" if not lo else f"in {lo}..{hi}"))
            else:
                raise ValueError
        except ValueError:
            raise TypeError(f"bound {spec!r}: expected '>= x', '> x', '<= x', '< x', 'a..b', 'a..' or '..b'") from None
    return parts


def _bound_words(spec: str) -> str:
    words = list(dict.fromkeys(w for _, w in _bound(spec)))  # 'a..b' gives its words twice, once per side
    return " and ".join(words)


def _classvars(cls: type) -> tuple[dict[str, tuple], dict[str, str], tuple[str, ...]]:
    """CHOICES, BOUNDS and REQUIRED of a config class, each name checked against its fields (a typo is a bug)."""
    choices, bounds, required = (getattr(cls, "CHOICES", {}), getattr(cls, "BOUNDS", {}),
                                 tuple(getattr(cls, "REQUIRED", ())))
    types = _field_types(cls)
    for kind, names in (("CHOICES", choices), ("BOUNDS", bounds), ("REQUIRED", required)):
        for name in names:
            if name not in types:
                raise TypeError(f"{cls.__name__}.{kind} names {name!r}, which is not a field")
    for name, spec in bounds.items():
        if types[name] not in (int, float):
            raise TypeError(f"{cls.__name__}.BOUNDS: {name} is not a number")
        _bound(spec)
    return choices, bounds, required


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def check(cfg: Any, origin: dict[str, str] | None = None) -> None:
    """Raise ConfigError for the first value that breaks the config class's REQUIRED, CHOICES or BOUNDS, or a float
    that is not finite (nan, inf).

    origin maps a field to the config file its value came from; the message then names the file too.
    """
    cls, origin = type(cfg), origin or {}
    choices, bounds, required = _classvars(cls)

    def where(name: str) -> str:
        return f" (from {origin[name]})" if name in origin else ""

    for name in required:
        value = getattr(cfg, name)
        if not (isinstance(value, str) and value.strip()):
            comment = re.sub(r"\s*\(required\)", "", field_comments(cls).get(name, "")).strip()
            raise ConfigError(f"{flag(name)}{where(name)} is required" + (f" ({comment})" if comment else ""))
    for f in dataclasses.fields(cls):
        value = getattr(cfg, f.name)
        if f.name in choices and value not in choices[f.name]:
            allowed = ", ".join(str(c) for c in choices[f.name])
            raise ConfigError(f"{flag(f.name)} {_show(value)}{where(f.name)}: choose from {allowed}")
        if f.name in bounds:
            for test, words in _bound(bounds[f.name]):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not test(value):
                    raise ConfigError(f"{flag(f.name)} {_show(value)}{where(f.name)}: must be {words}")
        if isinstance(value, float) and not math.isfinite(value):  # inf passes most bounds, nan those of no field
            raise ConfigError(f"{flag(f.name)} {value}{where(f.name)}: must be a finite number")


# ---------------------------------------------------------------------------------------------------- the file

def _yaml_loader() -> type:
    """yaml's SafeLoader, reading 2e-4 as a float (YAML 1.1 wants 2.0e-4 and would hand back the string '2e-4')."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                 re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                 list("-+0123456789"))
    return Loader


def _read_text(path: str) -> Any:
    """The parsed contents of a YAML or JSON file (JSON for .json, YAML otherwise: YAML reads JSON too)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path}: cannot read ({type(e).__name__}: {e})") from None
    if p.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
    import yaml

    try:
        return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}{at}: not valid YAML ({problem})") from None


def _typed(kind: type, value: Any, path: str, key: str) -> Any:
    """value as the field's type, or ConfigError: no conversions but int -> float (a file says what it means)."""
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    got = "null" if value is None else f"{value!r} ({type(value).__name__})"
    expected = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}[kind]
    raise ConfigError(f"{path}: {key}: expected {expected}, got {got}")


def read_file(cls: type, path: str) -> dict[str, Any]:
    """The fields set by a YAML or JSON config file, checked against cls's fields and types (not yet their values).

    Keys are field names, underscored or dashed; RETIRED keys are skipped, so a run's old config.json still loads.
    """
    data = _read_text(path)
    if data is None:  # an empty file, or one of comments only: almost surely the wrong file, never "no config"
        raise ConfigError(f"{path}: the config file is empty (no field is set); give a file of field values, or "
                          f"drop --config")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of field names to values at the top level, "
                          f"got {type(data).__name__}")
    types, retired = _field_types(cls), set(getattr(cls, "RETIRED", ()))
    values, keys = {}, {}
    for key, value in data.items():
        name = key.replace("-", "_") if isinstance(key, str) else key
        if name in retired:
            continue
        if name not in types:
            close = difflib.get_close_matches(str(name), list(types), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"{path}: unknown key {key!r} (not a field of {cls.__name__}{hint})")
        if name in keys:
            raise ConfigError(f"{path}: {name} given twice (as {keys[name]!r} and {key!r})")
        keys[name] = key
        values[name] = _typed(types[name], value, path, key)
    return values


# ---------------------------------------------------------------------------------------------------- command line

def _parser(cls: type, config_file: bool, description: str | None) -> argparse.ArgumentParser:
    types, defaults = _field_types(cls), {f.name: f.default for f in dataclasses.fields(cls)}
    choices, bounds, _ = _classvars(cls)
    comments = field_comments(cls)
    if description is None:
        doc = getattr(sys.modules.get(cls.__module__), "__doc__", None) or ""
        description = (doc.strip().splitlines() or [""])[0]
    # SUPPRESS: the namespace then holds only the flags given, which is how `parse` knows what was given.
    parser = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS)
    if config_file:
        if "config" in types:
            raise TypeError(f"{cls.__name__} has a field 'config', which clashes with --config; pass config_file=False")
        parser.add_argument("--config", metavar="FILE",
                            help="YAML or JSON file of field values (a run's config.json works); flags override it")
    for name, kind in types.items():
        text = comments.get(name, "")
        if name in bounds and bounds[name] not in text:
            text += f"; {_bound_words(bounds[name])}" if text else _bound_words(bounds[name])
        text = f"{text} [{defaults[name]}]".strip().replace("%", "%%")
        if kind is bool:
            parser.add_argument(flag(name), action=argparse.BooleanOptionalAction, help=text)
        else:
            # Choices are shown as the metavar but checked by `check`, so that a flag and a file get one message.
            metavar = "{" + ",".join(str(c) for c in choices[name]) + "}" if name in choices else name.upper()
            parser.add_argument(flag(name), type=kind, help=text, metavar=metavar)
    return parser


class Given(set):
    """The names of the fields given, on the command line or in the --config `file` (None without one); `from_file`
    names those whose value came from the file (a flag on the command line overrides the file)."""

    def __init__(self, names: Any = (), file: str | None = None, from_file: Any = ()):
        super().__init__(names)
        self.file, self.from_file = file, frozenset(from_file)


def parse(cls: type, argv: list[str] | None = None, *, config_file: bool = True,
          description: str | None = None) -> tuple[Any, Given]:
    """Build cls from the command line (argv, default sys.argv[1:]) and, with config_file, a --config FILE; check it.

    Returns the config and the names of the fields given (a `Given`: on the command line or in the file, and which
    came from the file). Raises ConfigError
    for a bad file or value; argparse itself exits with status 2 on an unknown flag or a malformed number.
    description: the --help headline (default: the first line of cls's module docstring).
    """
    given = vars(_parser(cls, config_file, description).parse_args(argv))
    path = given.pop("config", None)
    values = read_file(cls, path) if path is not None else {}
    origin = {name: path for name in values if name not in given}
    values.update(given)
    cfg = cls(**values)
    check(cfg, origin)
    return cfg, Given(values, file=path, from_file=origin)
