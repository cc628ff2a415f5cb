"""Typed config fields, once: a dataclass field declares its default, help, choices and check, and :class:`Fields`
reads YAML values and command-line text into the declared type, checks them with one-line errors, and makes the
``--flags``.

:class:`gcvimoe.train.TrainConfig` and :class:`gcvimoe.moe.MoEConfig` are declared with :func:`option`; the command
line is generated from them. The types understood: ``bool``, ``int``, ``float`` (also written ``5e-3``, which YAML
reads as a string), ``str``, ``Optional[...]`` (``null``), ``Union[bool, str]`` (a switch with named modes, such as
``compile: true|regional``), ``List[...]`` (``a,b`` or ``[a, b]`` on the command line), ``Dict`` and ``Any``.
"""
import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import yaml

from gcvimoe.errors import GcvimoeError, nearest


@dataclass(frozen=True)
class Check:
    """What a value must be beyond its type: ``ok(value, config)`` is true for a good value, and the error reads
    ``<key> <says>, got <value>``. ``says`` may name other fields of the config: ``"must be at most {config.x}"``.
    ``ok`` may also raise a :class:`GcvimoeError` of its own (a duration parser naming the forms it reads)."""
    ok: Callable[[Any, Any], bool]
    says: str


AT_LEAST_1 = Check(lambda value, config: value >= 1, "must be at least 1")
NOT_NEGATIVE = Check(lambda value, config: value >= 0, "must not be negative")


def option(default, help: str, choices: Optional[Sequence] = None,
           check: Union[Check, Sequence[Check], None] = None) -> Any:
    """A dataclass field with its help text, its allowed values and its checks (a list or dict default is copied)."""
    checks = () if check is None else (check,) if isinstance(check, Check) else tuple(check)
    metadata = {"help": help, "choices": choices, "checks": checks}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


_PLURALS = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}


def type_name(tp) -> str:
    """The type in the words of an error message: ``an integer``, ``a list of numbers or null``, ..."""
    if typing.get_origin(tp) is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if type(None) not in typing.get_args(tp):
            return " or ".join(type_name(a) for a in args)
        return f"{type_name(args[0])} or null"
    origin = typing.get_origin(tp)
    if origin in (list, List):
        return f"a list of {_PLURALS[typing.get_args(tp)[0]]}"
    if origin in (dict, Dict):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def metavar(tp) -> str:
    """The placeholder of a ``--flag`` of type ``tp`` in ``--help``."""
    if typing.get_origin(tp) is Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) in (list, List):
        return "A,B"
    return {int: "N", float: "X", str: "STR", bool: "BOOL"}.get(tp, "YAML")


def _shown(choices) -> str:
    return ", ".join(repr(c) if c == "" else str(c).lower() if isinstance(c, bool) else str(c) for c in choices)


_NO = object()  # "not a value of this type"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_float(value, strict: bool):
    # PyYAML reads 5e-3 (no dot) as a string, so numbers written that way are taken too, unless strict
    if isinstance(value, str) and not strict:
        try:
            value = float(value)
        except ValueError:
            return _NO
    return float(value) if _is_int(value) or isinstance(value, float) else _NO


def _convert(value, tp, strict: bool = False):
    """``value`` in type ``tp`` (the first type of a union that takes it), or ``_NO``. ``strict``: as given, no
    string read as a number."""
    if tp is Any:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        if value is None:  # null in any union: Optional, or a switch left unset
            return None
        converted = (_convert(value, a, strict) for a in args if a is not type(None))
        return next((c for c in converted if c is not _NO), _NO)
    if tp is float:
        return _as_float(value, strict)
    if tp is int:
        return value if _is_int(value) else _NO
    if origin in (list, List):
        items = [_convert(v, args[0], strict) for v in value] if isinstance(value, (list, tuple)) else [_NO]
        return _NO if any(item is _NO for item in items) else items
    if origin in (dict, Dict):
        return value if isinstance(value, dict) else _NO
    return value if isinstance(value, tp) else _NO


_TRUE_WORDS, _FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _from_text(text: str, tp) -> Any:
    """Command-line ``text`` as a value of the (non-union) type ``tp``; ValueError when it is not one."""
    if tp is bool:
        if text.lower() not in (*_TRUE_WORDS, *_FALSE_WORDS):
            raise ValueError(text)
        return text.lower() in _TRUE_WORDS
    if tp in (int, float, str):
        return tp(text)
    if typing.get_origin(tp) in (list, List):
        items = yaml.safe_load(text) if text.strip().startswith("[") else text.split(",")
        item_type = typing.get_args(tp)[0]
        return [item_type(item) if isinstance(item, str) else item for item in items]
    return yaml.safe_load(text)


class Fields(Mapping[str, dataclasses.Field]):
    """The fields of a config dataclass by name, and what is done with them: coercion, checks and ``--flags``.

    Args:
        cls: A dataclass declared with :func:`option`.
        label: How a check's error names a field: ``"config key '{}'"`` or ``"{}"``.
        finite: Checks also refuse ``nan`` and ``inf`` in every number (list items included).
    """

    def __init__(self, cls, label: str = "config key '{}'", finite: bool = False):
        self._fields = {f.name: f for f in dataclasses.fields(cls)}
        self.types = typing.get_type_hints(cls)
        self.label, self.finite = label, finite

    def __getitem__(self, name: str) -> dataclasses.Field:
        return self._fields[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def coerce(self, name: str, value: Any) -> Any:
        """A YAML or Python ``value`` of key ``name`` in the key's type (``5e-3`` read as a number), or a one-line
        error naming the key and the type or the choices it takes."""
        converted = _convert(value, self.types[name])
        if converted is _NO:
            raise GcvimoeError(f"config key '{name}' must be {type_name(self.types[name])}, got {value!r}")
        choices = self[name].metadata.get("choices")
        if converted is not None and choices is not None and converted not in choices:
            raise GcvimoeError(f"config key '{name}' must be one of {_shown(choices)}, got {converted!r}")
        return converted

    def parse_text(self, name: str, text: str) -> Any:
        """Command-line ``text`` in the type of key ``name``: ``null`` for an optional key, ``a,b`` or YAML for a
        list, the words true/false (yes/no, on/off, 1/0) or a mode for a switch with modes."""
        tp = self.types[name]
        if typing.get_origin(tp) is Union:
            if text.lower() in ("null", "none", "~"):
                return None
            options = [a for a in typing.get_args(tp) if a is not type(None)]
            if options[:2] == [bool, str] and text.lower() not in (*_TRUE_WORDS, *_FALSE_WORDS):
                return text  # a switch with named modes (compile: true or regional)
            tp = options[0]
        try:
            return _from_text(text, tp)
        except (ValueError, TypeError, yaml.YAMLError):
            raise GcvimoeError(f"--{name.replace('_', '-')} must be {type_name(tp)}, got {text!r}") from None

    def check(self, config) -> None:
        """Raise a one-line error for the first value of ``config`` that its type, choices or checks refuse."""
        if self.finite:
            self._check_finite(config)
        for name, f in self.items():
            value = getattr(config, name)
            if value is None and _convert(None, self.types[name], strict=True) is None:
                continue
            choices, checks = f.metadata.get("choices"), f.metadata.get("checks", ())
            if choices is not None:
                problem = None if value in choices else f"must be one of {_shown(choices)}"
            else:
                typed = _convert(value, self.types[name], strict=True) is not _NO
                failed = next((c for c in checks if not (typed and c.ok(value, config))), None)
                problem = failed.says.format(config=config) if failed else (
                    None if typed else f"must be {type_name(self.types[name])}")
            if problem:
                raise GcvimoeError(f"{self.label.format(name)} {problem}, got {value!r}")

    def _check_finite(self, config) -> None:
        for name in self:
            value = getattr(config, name)
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, float) and not math.isfinite(item):
                    raise GcvimoeError(f"{self.label.format(name)} must be a finite number, got {item}")

    def add_flags(self, parser: argparse.ArgumentParser, defaults: Mapping[str, Any], title: Optional[str] = None,
                  headings: Optional[Mapping[str, str]] = None, aliases: Optional[Mapping[str, Sequence[str]]] = None,
                  negatable: bool = False) -> None:
        """A ``--key`` option per field of ``defaults``, absent from the namespace unless given (read them back with
        :meth:`from_args`), its help ending in the default.

        Args:
            parser: Where the options go.
            defaults: The defaults ``--help`` shows, by key; a field not in it gets no option.
            title: The argument group of all the options (None: the parser itself).
            headings: A new argument group starts at each of these keys, with this title.
            aliases: Other option strings of a key (``--pretrained-path`` for timm users).
            negatable: A switch that is on by default also gets ``--no-key``.
        """
        headings, aliases = headings or {}, aliases or {}
        group = parser.add_argument_group(title) if title else parser
        for name, f in self.items():
            if name in headings:
                group = parser.add_argument_group(headings[name])
            if name not in defaults:
                continue
            flag, tp = f"--{name.replace('_', '-')}", self.types[name]
            is_switch = bool in (tp, *typing.get_args(tp))  # maybe with named modes
            group.add_argument(flag, *aliases.get(name, ()), dest=name, default=argparse.SUPPRESS,
                               metavar=metavar(tp), nargs="?" if is_switch else None,
                               const="true" if is_switch else None,
                               help=f"{f.metadata['help']} (default: {defaults[name]!r})")
            if negatable and is_switch and defaults[name] is True:
                group.add_argument(f"--no-{name.replace('_', '-')}", dest=name, action="store_const", const="false",
                                   default=argparse.SUPPRESS, help=f"turn {flag} off")

    def from_args(self, args: argparse.Namespace) -> Dict[str, Any]:
        """The keys given on the command line (see :meth:`add_flags`), typed."""
        return {name: self.parse_text(name, getattr(args, name)) for name in self if hasattr(args, name)}


def suggest_unknown_flags(parser: argparse.ArgumentParser, keys: Sequence[str], fallback: str) -> None:
    """Make an unknown ``--option`` of ``parser`` an error naming the nearest of ``keys`` (argparse alone only lists
    it), else ending in ``fallback``."""
    parse_known_args = parser.parse_known_args

    def parse_with_suggestion(args=None, namespace=None):
        namespace, extras = parse_known_args(args, namespace)
        for arg in extras:
            if arg.startswith("--"):
                option = arg[2:].split("=", 1)[0].replace("-", "_")
                close = nearest(option, keys)
                hint = f"; did you mean --{close.replace('_', '-')}?" if close else f"; {fallback}"
                parser.error(f"unknown option {arg.split('=', 1)[0]}{hint}")
        return namespace, extras

    parser.parse_known_args = parse_with_suggestion
