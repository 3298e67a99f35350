"""One way to configure a service: a dataclass whose fields carry the defaults, `problems()` that
lists every problem at once, `validate()` that raises them together, and command-line flags
generated from the fields.

    @dataclass
    class LoaderConfig:
        kafka: KafkaConfig = option(factory=KafkaConfig, aliases={"bootstrap_servers": ("--bootstrap",)})
        topic: str = option("tensortrace.activations", "topic to read")
        batch_max_rows: int = 20_000

        def problems(self) -> list[str]:
            p = Problems()
            p.check(bool(self.topic), "topic", "empty")
            p.check(self.batch_max_rows >= 1, "batch_max_rows", f"{self.batch_max_rows} < 1")
            p.extend(self.kafka.problems(), prefix="kafka.")
            return p.items

        def validate(self) -> "LoaderConfig":
            return raise_problems(self, "loader config")

    cfg = config_from_args(LoaderConfig, ["--bootstrap", "k:9092", "--batch-max-rows", "500"])
    cfg.kafka.bootstrap_servers, cfg.batch_max_rows      # ('k:9092', 500)

Flags: a field `batch_max_rows` is `--batch-max-rows`; a nested dataclass field `kafka` contributes
`--kafka-bootstrap-servers`, `--kafka-security-protocol`, ... (one per field of the nested class).
`option(default, help, aliases=...)` (a dataclass field with metadata {"help", "aliases"}) adds
the help text and alias flags (for a nested field: a dict from sub-field to aliases); a class-level
`flag_aliases` / `flag_help` table does the same for inherited fields; `flag=False` keeps a field
off the command line. Types: str, int, float, bool (`--x` / `--no-x` / `--x=false`), `tuple[int, ...]`
(comma list), `int | None` (empty: None), `dict` (JSON object) and nested dataclasses.

Why integers parse strictly: Helm renders a large number from values.yaml as a float
(`1048576` -> `1.048576e+06`) unless the template says `int`. `int("1.048576e+06")` would crash the
pod in a loop with a traceback; here the flag is refused with a message that names it and says why.

Secrets never become flags (they would show in `ps` and in the pod spec): a field named like a
password, secret or token is refused when flags are generated; such values come from a file or the
environment (see `KafkaConfig.sasl_password_file`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import types
import typing
from typing import Any, Iterable, Iterator, TypeVar

C = TypeVar("C")

_SECRET_NAME = re.compile(r"(^|_)(password|passwd|secret|token|api_key)$")


class ConfigError(ValueError):
    """One or more configuration values cannot work. `problems` lists each as "field: why"; the
    message has one problem per line, each prefixed with the subject ("exporter config: ...")."""

    def __init__(self, problems: Iterable[str] | str, subject: str = ""):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.subject = subject
        prefix = f"{subject}: " if subject else ""
        super().__init__("\n".join(prefix + p for p in self.problems))


class Problems:
    """Collects configuration problems so that all of them are reported at once.

    >>> p, port = Problems(), 70000
    >>> p.check(port <= 65535, "port", f"{port} is not a TCP port")
    False
    >>> p.extend(["bootstrap_servers: empty"], prefix="kafka.")    # a nested config's problems()
    >>> p.items
    ['port: 70000 is not a TCP port', 'kafka.bootstrap_servers: empty']
    """

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, field: str, why: str) -> None:
        self.items.append(f"{field}: {why}")

    def check(self, ok: bool, field: str, why: str) -> bool:
        if not ok:
            self.add(field, why)
        return ok

    def extend(self, problems: Iterable[str], prefix: str = "") -> None:
        self.items.extend(prefix + p for p in problems)

    def __bool__(self) -> bool:
        return bool(self.items)

    def __len__(self) -> int:
        return len(self.items)


def raise_problems(cfg: C, subject: str) -> C:
    """`cfg.problems()` as one ConfigError (every problem, one per line); `cfg` when there are none.
    The body of every config's `validate()`."""
    problems = cfg.problems()  # type: ignore[attr-defined]
    if problems:
        raise ConfigError(problems, subject)
    return cfg


def option(default: Any = dataclasses.MISSING, help: str | dict = "", *, aliases: tuple | dict = (),
           factory: Any = dataclasses.MISSING, flag: bool = True) -> Any:
    """A config field with its help text and alias flags, read by flags_from_dataclass.

        ring_dir: str = option("/run/tensortrace", "directory watched for *.ring files")
        kafka: KafkaConfig = option(factory=KafkaConfig, aliases={"bootstrap_servers": ("--bootstrap-servers",)})
    """
    metadata: dict[str, Any] = {"help": help, "aliases": aliases}
    if not flag:
        metadata["flag"] = False
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# -- value parsers (argparse `type=`): each error message names the problem, argparse names the flag --

def parse_int(text: str) -> int:
    s = text.strip()
    try:
        return int(s, 10)
    except ValueError:
        pass
    try:
        as_float = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    raise argparse.ArgumentTypeError(
        f"{text!r} is a floating-point number, not an integer"
        + (f" (did a Helm template render {int(as_float)} as a float? use `int` in the template)"
           if as_float == as_float and abs(as_float) < 1e18 and as_float == int(as_float) else ""))


def parse_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return v


def parse_optional_int(text: str) -> int | None:
    return None if text.strip().lower() in ("", "none") else parse_int(text)


def parse_int_list(text: str) -> tuple[int, ...]:
    return tuple(parse_int(x) for x in text.split(",") if x.strip())


def parse_json_object(text: str) -> dict:
    try:
        v = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}): {text[:80]!r}") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {type(v).__name__}")
    return v


def parse_bool(text: str) -> bool:
    s = text.strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


class _BoolFlag(argparse.Action):
    """`--x`, `--no-x` and `--x=true|false` (what a Helm template renders from a boolean value)."""

    def __init__(self, option_strings, dest, default=None, help=None, **kw):
        strings = list(option_strings)
        for s in option_strings:
            if s.startswith("--"):
                strings.append("--no-" + s[2:])
        super().__init__(strings, dest, nargs="?", default=default, help=help, metavar="true|false")

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string and option_string.startswith("--no-"):
            if values is not None:
                parser.error(f"{option_string} takes no value")
            setattr(namespace, self.dest, False)
        else:
            try:
                setattr(namespace, self.dest, True if values is None else parse_bool(values))
            except argparse.ArgumentTypeError as e:
                parser.error(f"argument {option_string}: {e}")

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


class FlagParser(argparse.ArgumentParser):
    """argparse, but a bad flag prints one line naming it (not the whole usage) and exits 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


# -- flags from a dataclass -----------------------------------------------------------------------

def flag_name(field_path: str) -> str:
    """`kafka.bootstrap_servers` -> `--kafka-bootstrap-servers`."""
    return "--" + field_path.replace(".", "-").replace("_", "-")


def _flag_fields(cls: type, prefix: str) -> Iterator[tuple[dataclasses.Field, str, Any]]:
    """(field, path, type) of each field of `cls` that is on the command line: every init field
    without metadata flag=False. The path is `prefix` + the field's name."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.init and f.metadata.get("flag", True) is not False:
            yield f, prefix + f.name, hints[f.name]


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _parser_for(tp: Any, where: str):
    """(argparse type function, is_bool) for a field type."""
    base, optional = _unwrap_optional(tp)
    origin = typing.get_origin(base)
    if base is bool:
        return None, True
    if base is int:
        return (parse_optional_int if optional else parse_int), False
    if base is float:
        return parse_float, False
    if base is str:
        return str, False
    if base is dict or origin is dict:
        return parse_json_object, False
    if origin is tuple and typing.get_args(base)[:1] == (int,):
        return parse_int_list, False
    raise TypeError(f"{where}: no flag for a field of type {tp!r}; use metadata={{'flag': False}}")


_METAVARS = {parse_int: "INT", parse_optional_int: "INT", parse_float: "NUMBER", str: "TEXT",
             parse_int_list: "INT,...", parse_json_object: "JSON"}


def _default_text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, tuple):
        return ",".join(map(str, v)) or "none"
    if isinstance(v, dict):
        return json.dumps(v)
    if v is None or v == "":
        return "none"
    return str(v)


def flags_from_dataclass(cls: type, parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                         prefix: str = "", aliases: dict | None = None, helps: dict | None = None,
                         defaults: Any = None, dest_prefix: str = "") -> dict[str, str]:
    """Add one `--kebab-case` flag per field of `cls` (recursing into nested dataclasses) to `parser`.
    Every flag defaults to "not given", so the dataclass keeps owning its defaults.
    Returns {field path: flag}, e.g. {"kafka.bootstrap_servers": "--kafka-bootstrap-servers"}.

    Alias flags and help: `metadata={"aliases": ("--x",), "help": "..."}` on a field; for a nested
    dataclass field, dicts from its sub-fields (`{"aliases": {"bootstrap_servers": ("--bootstrap",)}}`);
    and for fields a config inherits, class-level tables keyed by field path:
    `flag_aliases: ClassVar[dict] = {"kafka.bootstrap_servers": ("--bootstrap",)}`, `flag_help`.
    `defaults`: the instance whose values the help shows (default: `cls()`). `dest_prefix` keeps
    two dataclasses apart in one namespace (read back with `config_from_namespace(prefix=...)`)."""
    aliases = dict(aliases or {})
    helps = dict(helps or {})
    for table, out_table in ((getattr(cls, "flag_aliases", None), aliases), (getattr(cls, "flag_help", None), helps)):
        for k, v in (table or {}).items():
            out_table.setdefault(prefix + k, v)
    defaults = cls() if defaults is None else defaults
    flags: dict[str, str] = {}
    for f, path, tp in _flag_fields(cls, prefix):
        if dataclasses.is_dataclass(tp):
            sub_aliases = f.metadata.get("aliases") if isinstance(f.metadata.get("aliases"), dict) else {}
            sub_help = f.metadata.get("help") if isinstance(f.metadata.get("help"), dict) else {}
            nested_aliases = {**{f"{path}.{k}": v for k, v in sub_aliases.items()}, **aliases}
            nested_help = {**{f"{path}.{k}": v for k, v in sub_help.items()}, **helps}
            flags.update(flags_from_dataclass(tp, parser, path + ".", nested_aliases, nested_help,
                                              getattr(defaults, f.name), dest_prefix))
            continue
        if _SECRET_NAME.search(f.name):
            raise TypeError(f"{cls.__name__}.{f.name}: a secret never becomes a flag (it would show in ps "
                            "and in the pod spec); read it from a file or the environment")
        own = f.metadata.get("aliases", ())
        extra = [*(own if isinstance(own, (tuple, list)) else ()), *aliases.get(path, ())]
        names = [flag_name(path)] + [a for a in dict.fromkeys(extra) if a != flag_name(path)]
        text = helps.get(path) or (f.metadata.get("help") if isinstance(f.metadata.get("help"), str) else "") or ""
        text = (text + " " if text else "") + f"(default: {_default_text(getattr(defaults, f.name))})"
        kind, is_bool = _parser_for(tp, f"{cls.__name__}.{f.name}")
        if is_bool:
            parser.add_argument(*names, dest=dest_prefix + path, action=_BoolFlag, default=argparse.SUPPRESS, help=text)
        else:
            parser.add_argument(*names, dest=dest_prefix + path, type=kind, default=argparse.SUPPRESS, help=text,
                                metavar=f.metadata.get("metavar") or _METAVARS.get(kind, "VALUE"))
        flags[dest_prefix + path] = names[0]
    return flags


def config_from_namespace(cls: type[C], ns: argparse.Namespace | dict, prefix: str = "", base: C | None = None) -> C:
    """The dataclass built from the flags that were given; the others keep their defaults (or the
    values of `base`)."""
    given = vars(ns) if isinstance(ns, argparse.Namespace) else ns
    kwargs: dict[str, Any] = {}
    for f, path, tp in _flag_fields(cls, prefix):
        if dataclasses.is_dataclass(tp):
            if any(k.startswith(path + ".") for k in given):
                kwargs[f.name] = config_from_namespace(tp, given, path + ".",
                                                       getattr(base, f.name) if base is not None else None)
        elif path in given:
            kwargs[f.name] = given[path]
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


def config_from_args(cls: type[C], argv: list[str], prog: str | None = None, description: str | None = None) -> C:
    """Parse `argv` into `cls` (no validation). Unknown flags and unparsable values exit 2 with
    argparse's message naming the flag."""
    p = FlagParser(prog=prog, description=description)
    flags_from_dataclass(cls, p)
    return config_from_namespace(cls, p.parse_args(argv))


def flag_for_problem(problem: str, flags: dict[str, str]) -> str:
    """"kafka.bootstrap_servers: ..." -> "kafka.bootstrap_servers (--kafka-bootstrap-servers): ..."."""
    field, sep, why = problem.partition(": ")
    if sep and field in flags:
        return f"{field} ({flags[field]}): {why}"
    return problem
