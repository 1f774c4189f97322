"""Frozen records: a class decorated with `frozen_record` takes its annotated fields (with
their defaults) as arguments, holds them for good, and is compared, hashed and shown by
them. `NodeConfig` and `Peer` are records.

The standard library's dataclasses do the same, but a node's start-up paid for them: their
import loads ``inspect`` (with ``ast`` and ``dis``), and each class compiles its generated
methods; together about 12 ms on the benchmark machine, a sixth of ``from zmqmesh import
Node``. Records compile nothing: their methods are shared, and read the class's fields.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import ArgumentTypeError

__all__ = ["frozen_record", "fields_of", "replaced"]

_T = TypeVar("_T")
_FIELDS = "__record_fields__"
_DEFAULTS = "__record_defaults__"
_HIDDEN = "__record_hidden__"  # (a class's names of fields its repr shows as <hidden>, unless None: secrets)

if TYPE_CHECKING:  # (the decorator only informs type checkers: on every Python they read it from here)
    from typing_extensions import dataclass_transform
elif sys.version_info >= (3, 11):
    from typing import dataclass_transform
else:
    def dataclass_transform(**_: Any) -> Callable[[_T], _T]:
        return lambda decorated: decorated


@dataclass_transform(frozen_default=True)
def frozen_record(cls: type[_T]) -> type[_T]:
    """Make ``cls`` a frozen record of its annotated fields, in their order; a field with a
    class-level value has it as default (defaults are shared: give immutable ones). The
    class may define ``__post_init__(self)`` to check or normalise the fields (assigning
    with ``object.__setattr__``); the decorator gives it its ``__init__``, ``__eq__``,
    ``__hash__``, ``__repr__``, ``__match_args__``, ``__setattr__`` and ``__delattr__``
    (the last two raise `AttributeError`); records copy as plain objects do. The fields
    the class names in ``__record_hidden__`` (secrets) are shown as ``<hidden>`` unless
    None. Construction raises `ArgumentTypeError` (a ``TypeError``) for an unknown,
    repeated or missing argument; the decorator raises ``TypeError`` for a field without a
    default after one with a default."""
    names = tuple(cls.__dict__.get("__annotations__", {}))
    defaulted = False
    for name in names:
        if name in cls.__dict__:
            defaulted = True
        elif defaulted:
            raise TypeError(f"{cls.__name__}.{name}: a field without a default follows one with a default")
    given = {
        _FIELDS: names,
        _DEFAULTS: {name: cls.__dict__[name] for name in names if name in cls.__dict__},
        "__match_args__": names,  # (positional patterns, as a dataclass's)
        "__init__": _init, "__setattr__": _setattr, "__delattr__": _delattr, "__eq__": _eq, "__hash__": _hash,
        "__repr__": _repr,
    }
    for name, value in given.items():
        setattr(cls, name, value)
    return cls


def fields_of(record: Any) -> tuple[str, ...]:
    """The field names of a record (or of its class), in order. Raises `TypeError` for
    anything else."""
    names: tuple[str, ...] | None = getattr(record, _FIELDS, None)
    if names is None:
        raise TypeError(f"{record!r} is not a frozen record")
    return names


def replaced(record: _T, **changes: Any) -> _T:
    """A copy of ``record`` with ``changes`` (checked by its class as at construction).
    Raises `ArgumentTypeError` (a ``TypeError``) for a name that is not a field."""
    values = {name: getattr(record, name) for name in fields_of(record)}
    unknown = changes.keys() - values.keys()
    if unknown:
        raise ArgumentTypeError(f"{type(record).__name__} has no field(s) {', '.join(sorted(unknown))}")
    return type(record)(**{**values, **changes})


def _init(self: Any, *args: Any, **kwargs: Any) -> None:
    cls = type(self)
    names: tuple[str, ...] = getattr(cls, _FIELDS)
    defaults: dict[str, Any] = getattr(cls, _DEFAULTS)
    if len(args) > len(names):
        raise ArgumentTypeError(f"{cls.__name__}() takes {len(names)} arguments, got {len(args)}")
    given = dict(zip(names, args))
    unknown = kwargs.keys() - set(names)
    if unknown:
        raise ArgumentTypeError(f"{cls.__name__}() got unexpected argument(s) {', '.join(sorted(unknown))}")
    twice = given.keys() & kwargs.keys()
    if twice:
        raise ArgumentTypeError(f"{cls.__name__}() got argument(s) {', '.join(sorted(twice))} twice")
    given.update(kwargs)
    for name in names:
        if name in given:
            value = given[name]
        elif name in defaults:
            value = defaults[name]
        else:
            raise ArgumentTypeError(f"{cls.__name__}() is missing the argument {name!r}")
        object.__setattr__(self, name, value)
    post_init = getattr(self, "__post_init__", None)
    if post_init is not None:
        post_init()


def _setattr(self: Any, name: str, value: Any) -> None:
    raise AttributeError(f"{type(self).__name__} is frozen: cannot assign {name!r}")


def _delattr(self: Any, name: str) -> None:
    raise AttributeError(f"{type(self).__name__} is frozen: cannot delete {name!r}")


def _values(record: Any) -> tuple[Any, ...]:
    return tuple(getattr(record, name) for name in getattr(record, _FIELDS))


def _eq(self: Any, other: Any) -> Any:
    if type(other) is not type(self):
        return NotImplemented
    return _values(self) == _values(other)


def _hash(self: Any) -> int:
    return hash(_values(self))


def _repr(self: Any) -> str:
    hidden = getattr(self, _HIDDEN, ())
    shown = ", ".join(f"{name}=<hidden>" if name in hidden and getattr(self, name) is not None
                      else f"{name}={getattr(self, name)!r}" for name in getattr(self, _FIELDS))
    return f"{type(self).__qualname__}({shown})"
