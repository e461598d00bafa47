"""Ranges of numeric settings, declared beside the config dataclass fields that hold them.

A field declared as ``num_layers: int = bounded(2, ge=1)`` carries its range in the field's metadata. Three
readers share it, so a range is written once:

- :func:`check` and :func:`problems` (configs built in code or read from YAML, which never pass through argparse);
- :func:`flag_type`, the ``type=`` of a flag: argparse converts and checks the value, so a bad one is a usage
  error naming the flag (exit 2, no traceback) before any work starts;
- :func:`argument` (and :func:`describe`), which put the range into ``--help``.

Floats must be finite everywhere (NaN and infinities are refused even without a range), and integer fields refuse
fractions. Standard library only: ``tools/annotator_server.py`` runs under any Python. Checking a config costs one
pass over its fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

_META_KEY = "megatron_anchor.bounds"


@dataclass(frozen=True)
class Bounds:
    """An interval of allowed values; a None end is open-ended. Values are also required to be finite."""

    ge: Optional[float] = None
    """Smallest allowed value (inclusive)."""
    gt: Optional[float] = None
    """Values must be above this (exclusive)."""
    le: Optional[float] = None
    """Largest allowed value (inclusive)."""
    lt: Optional[float] = None
    """Values must be below this (exclusive)."""

    def describe(self) -> str:
        """``>= 1``, ``> 0``, ``in [0, 1)``, or ``finite`` when there is no end."""
        low = ("[", self.ge) if self.ge is not None else ("(", self.gt) if self.gt is not None else None
        high = ("]", self.le) if self.le is not None else (")", self.lt) if self.lt is not None else None
        if low and high:
            return f"in {low[0]}{_num(low[1])}, {_num(high[1])}{high[0]}"
        if low:
            return f"{'>=' if low[0] == '[' else '>'} {_num(low[1])}"
        if high:
            return f"{'<=' if high[0] == ']' else '<'} {_num(high[1])}"
        return "finite"

    def problem(self, value: Any, integer: bool = False) -> Optional[str]:
        """Why ``value`` is not allowed (None when it is, and for None itself: optional settings)."""
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be {'an integer' if integer else 'a number'}, got {value!r}"
        if integer and not isinstance(value, int):
            if not (math.isfinite(value) and float(value).is_integer()):
                return f"must be an integer, got {value!r}"
        if not math.isfinite(value):
            return f"must be a finite number, got {value}"
        if ((self.ge is not None and value < self.ge) or (self.gt is not None and value <= self.gt)
                or (self.le is not None and value > self.le) or (self.lt is not None and value >= self.lt)):
            return f"must be {self.describe()}, got {_num(value)}"
        return None


FINITE = Bounds()
"""No range, finite only (what a numeric field without :func:`bounded` gets)."""


def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def bounded(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
            ge: Optional[float] = None, gt: Optional[float] = None, le: Optional[float] = None,
            lt: Optional[float] = None) -> Any:
    """A dataclass field with a range: ``lr: float = bounded(1e-3, gt=0)``."""
    meta = {_META_KEY: Bounds(ge=ge, gt=gt, le=le, lt=lt)}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _field(cls: type, name: str) -> dataclasses.Field:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def bounds_of(cls: type, name: str) -> Bounds:
    """The range of field ``name`` of the dataclass ``cls`` (:data:`FINITE` when it declares none)."""
    return _field(cls, name).metadata.get(_META_KEY, FINITE)


def _numeric_kind(annotation: Any) -> Optional[type]:
    """int or float for ``int``, ``Optional[float]``, ``List[int]``, ...; None for anything else."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, list, List, tuple):
        for arg in typing.get_args(annotation):
            kind = _numeric_kind(arg)
            if kind is not None:
                return kind
        return None
    return annotation if annotation in (int, float) else None


def _default_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def problems(obj: Any, flag_of: Callable[[str], str] = _default_flag) -> List[str]:
    """``"--flag: must be >= 1, got 0"`` for every numeric field of the dataclass ``obj`` (and of the dataclasses
    it holds) that is out of its range, not finite, or of the wrong kind. Lists are checked element by element."""
    out: List[str] = []
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out += problems(value, flag_of)
            continue
        kind = _numeric_kind(hints.get(f.name))
        if kind is None:
            continue
        rng = f.metadata.get(_META_KEY, FINITE)
        for item in (value if isinstance(value, (list, tuple)) else [value]):
            why = rng.problem(item, integer=kind is int)
            if why:
                out.append(f"{flag_of(f.name)}: {why}")
                break
    return out


def check(obj: Any, error: Callable[[str], Exception] = ValueError,
          flag_of: Callable[[str], str] = _default_flag) -> None:
    """Raise ``error`` listing :func:`problems` of ``obj``, if any."""
    found = problems(obj, flag_of)
    if found:
        raise error("; ".join(found))


def flag_type(kind: type, rng: Bounds = FINITE) -> Callable[[str], Any]:
    """An argparse ``type=``: converts with ``kind`` (int or float) and refuses values outside ``rng`` (and
    NaN/inf), so argparse names the flag and exits 2."""

    def convert(text: str):
        value = kind(text)  # a ValueError here is argparse's "invalid int value: 'x'"
        why = rng.problem(value, integer=kind is int)
        if why:
            raise argparse.ArgumentTypeError(why)
        return value

    convert.__name__ = kind.__name__
    return convert


def describe(cls: type, name: str) -> str:
    """The range of a field as ``--help`` shows it: `` [>= 1]`` (empty without a range)."""
    rng = bounds_of(cls, name)
    return "" if rng == FINITE else f" [{rng.describe()}]"


def argument(cls: type, name: str, help: str, **kwargs: Any) -> Dict[str, Any]:
    """``add_argument`` keywords for a flag that sets field ``name`` of ``cls``: its type (checked against the
    field's range), its default, and ``help`` with the range appended. ``kwargs`` override any of them."""
    f = _field(cls, name)
    kind = _numeric_kind(typing.get_type_hints(cls)[name])
    if kind is None:
        raise TypeError(f"{cls.__name__}.{name} is not numeric")
    out: Dict[str, Any] = {"type": flag_type(kind, bounds_of(cls, name)), "help": help + describe(cls, name)}
    if f.default is not dataclasses.MISSING:
        out["default"] = f.default
    out.update(kwargs)
    return out


def ranged(kind: type, help: str, **limits: float) -> Dict[str, Any]:
    """``add_argument`` keywords for a numeric flag that no config dataclass holds (a tool's own option):
    ``p.add_argument("--port", default=8000, **ranged(int, "port", ge=1, le=65535))``."""
    rng = Bounds(**limits)
    return {"type": flag_type(kind, rng), "help": help + ("" if rng == FINITE else f" [{rng.describe()}]")}


def field_argument(cls: type, name: str, help: str, **kwargs: Any) -> Dict[str, Any]:
    """``add_argument`` keywords for a flag that sets field ``name`` of the dataclass ``cls``, of any type: the
    parsed value lands in ``args.<name>`` (``dest``) with the field's default, and numeric fields get
    :func:`argument`'s checked type and range. ``kwargs`` override any of them (``action="store_false"`` for a
    ``--no-X`` flag of a field that defaults to True; ``metavar`` where the flag's name differs from the field's).
    :func:`fields_from_args` collects what such flags parsed, so a tool never copies them one by one."""
    f = _field(cls, name)
    if _numeric_kind(typing.get_type_hints(cls)[name]) is not None:
        out = argument(cls, name, help)
    else:
        out = {"help": help}
        if f.default is not dataclasses.MISSING:
            out["default"] = f.default
    out["dest"] = name
    if kwargs.get("action") in ("store_true", "store_false"):
        out.pop("type", None)
    out.update(kwargs)
    return out


def fields_from_args(cls: type, args: argparse.Namespace) -> Dict[str, Any]:
    """``{field: value}`` for every field of the dataclass ``cls`` that ``args`` holds (the flags built with
    :func:`field_argument`), ready for ``cls(**fields_from_args(cls, args), other=...)``. One pass over the fields."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
