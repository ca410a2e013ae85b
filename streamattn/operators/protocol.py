"""The operator protocol: every algorithm is a mergeable sketch (a commutative monoid).

An operator is built from a frozen *spec* (its parameters, seed included) and holds a
*state*. The laws, checked for every operator in ``tests/test_operator_laws.py``:

- ``op.empty()`` is the identity: ``empty.merge(a)`` has the result of ``a``;
- ``merge`` is associative and commutative up to float rounding;
- folding the same rows in any chunking and any merge tree gives the same result;
- ``Operator.from_state(op.to_state())`` gives back an equal operator.

States are flat ``dict[str, numpy.ndarray]`` (scalars as 0-d arrays, text as 0-d
unicode arrays): they go into ``np.savez`` or zarr without pickle, and they are what
travels between Dask workers. Every state records the family, the format version, the
spec and the row ranges it covers; ``merge`` refuses another spec or overlapping rows
(a block folded twice) with :class:`~streamattn.errors.IncompatibleMergeError`.

Engines only ever call ``empty``, ``update``, ``merge``, ``to_state``/``from_state`` and
``result``: no engine code knows any algorithm.
"""

from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Generic, Self, TypeVar

import numpy as np

from streamattn.errors import IncompatibleMergeError, StateFormatError
from streamattn.sources import Block

State = dict[str, np.ndarray]

#: An operator's spec type (a frozen dataclass) and result type.
SpecT = TypeVar("SpecT")
ResultT = TypeVar("ResultT", covariant=True)

_REGISTRY: dict[str, type[Operator[Any, Any]]] = {}


class RowRanges:
    """A set of disjoint half-open row ranges ``[a, b)``, kept sorted and coalesced."""

    def __init__(self, ranges: list[tuple[int, int]] | None = None) -> None:
        self._ranges: list[tuple[int, int]] = []
        for a, b in ranges or []:
            self.add(a, b)

    def add(self, start: int, stop: int) -> None:
        if stop <= start:
            return
        if self.overlaps(start, stop):
            raise IncompatibleMergeError(
                f"rows [{start}, {stop}) overlap rows already folded into this state "
                f"{self.as_list()}; a block must be folded exactly once."
            )
        merged = sorted([*self._ranges, (start, stop)])
        out: list[tuple[int, int]] = []
        for a, b in merged:
            if out and out[-1][1] == a:
                out[-1] = (out[-1][0], b)
            else:
                out.append((a, b))
        self._ranges = out

    def overlaps(self, start: int, stop: int) -> bool:
        return any(a < stop and start < b for a, b in self._ranges)

    def union(self, other: RowRanges) -> None:
        for a, b in other._ranges:
            self.add(a, b)

    @property
    def total(self) -> int:
        return sum(b - a for a, b in self._ranges)

    def as_list(self) -> list[tuple[int, int]]:
        return list(self._ranges)

    def to_array(self) -> np.ndarray:
        return np.asarray(self._ranges, dtype=np.int64).reshape(-1, 2)

    @classmethod
    def from_array(cls, arr: np.ndarray) -> RowRanges:
        return cls([(int(a), int(b)) for a, b in np.asarray(arr).reshape(-1, 2)])


def spec_to_state(spec: Any) -> State:
    """Serialise a spec dataclass: scalars/strings/tuples as JSON, arrays as arrays."""
    plain: dict[str, Any] = {}
    out: State = {}
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        if isinstance(value, np.ndarray):
            out[f"spec.{f.name}"] = value
        else:
            plain[f.name] = list(value) if isinstance(value, tuple) else value
    out["spec"] = np.array(json.dumps(plain, sort_keys=True))
    return out


def spec_from_state(spec_cls: type, state: State) -> Any:
    try:
        plain = json.loads(str(state["spec"]))
    except (KeyError, json.JSONDecodeError) as exc:
        raise StateFormatError(f"state has no readable spec: {exc}") from exc
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(spec_cls):
        key = f"spec.{f.name}"
        if key in state:
            kwargs[f.name] = np.asarray(state[key])
        elif f.name in plain:
            value = plain[f.name]
            kwargs[f.name] = tuple(value) if isinstance(value, list) else value
    try:
        return spec_cls(**kwargs)
    except TypeError as exc:
        raise StateFormatError(f"state spec does not fit {spec_cls.__name__}: {exc}") from exc


def encode_state(state: State) -> np.ndarray:
    """Deterministic uint8 encoding of a flat state (same arrays -> same bytes)."""
    header: list[list[Any]] = []
    parts: list[bytes] = []
    for key in sorted(state):
        arr = np.asarray(state[key])  # tobytes() is C order; keeps 0-d shapes
        raw = arr.tobytes()
        header.append([key, arr.dtype.str, list(arr.shape), len(raw)])
        parts.append(raw)
    head = json.dumps(header).encode()
    blob = len(head).to_bytes(8, "little") + head + b"".join(parts)
    return np.frombuffer(blob, dtype=np.uint8).copy()


def decode_state(blob: np.ndarray) -> State:
    """Inverse of :func:`encode_state`."""
    raw = np.asarray(blob, dtype=np.uint8).tobytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size].decode())
    out: State = {}
    pos = 8 + size
    for key, dtype, shape, nbytes in header:
        out[key] = np.frombuffer(raw[pos : pos + nbytes], dtype=dtype).reshape(tuple(shape))
        pos += nbytes
    return out


def specs_equal(a: Any, b: Any) -> bool:
    """Field-by-field equality that treats array fields by value."""
    if type(a) is not type(b):
        return False
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)):
                return False
            if x.shape != y.shape or not np.array_equal(x, y):
                return False
        elif x != y:
            return False
    return True


class Operator(ABC, Generic[SpecT, ResultT]):
    """Base class of every mergeable operator, generic over its spec and result types.

    Subclasses (``class MyOp(Operator[MySpec, MyResult])``) set ``family`` (a unique
    name), ``Spec`` (the frozen dataclass, for construction checks and ``from_state``)
    and implement ``_update``, ``_merge``, ``_state``, ``_load``, ``result`` and
    ``nbytes_bound``. ``merge`` mutates ``self`` and returns it; ``other`` is unchanged.
    """

    family: ClassVar[str]
    format_version: ClassVar[int] = 1
    Spec: ClassVar[type]
    #: True where two instances may be updated from different threads at once (all mutable
    #: state lives in the instance; kernels release the GIL): ``MultiHead`` then folds its
    #: heads side by side.
    concurrent_updates: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        family = cls.__dict__.get("family")
        if family is not None:
            known = _REGISTRY.get(family)
            # A module imported twice (e.g. by a Dask worker) re-registers the same class.
            if known is not None and known.__qualname__ != cls.__qualname__:
                raise TypeError(
                    f"operator family {family!r} registered twice: {known.__qualname__} "
                    f"and {cls.__qualname__}"
                )
            _REGISTRY[family] = cls

    def __init__(self, spec: SpecT) -> None:
        if not isinstance(spec, self.Spec):
            raise TypeError(f"{type(self).__name__} needs a {self.Spec.__name__}, got {spec!r}")
        self.spec: SpecT = spec
        self.covered = RowRanges()

    # ------------------------------------------------------------------ the monoid
    def empty(self) -> Self:
        """A new operator with the same spec and no rows: the merge identity."""
        return type(self)(self.spec)

    def update(self, block: Block) -> Self:
        """Fold one block of rows (global indices ``block.start ..``) into the state."""
        self.covered.add(block.start, block.stop)
        self._update(block)
        return self

    def merge(self, other: Operator[Any, Any]) -> Self:
        """Fold another state over disjoint rows into this one (in place)."""
        if type(other) is not type(self):
            raise IncompatibleMergeError(
                f"cannot merge {type(other).__name__} into {type(self).__name__}."
            )
        if not specs_equal(self.spec, other.spec):
            raise IncompatibleMergeError(
                f"cannot merge {self.family} states with different specs: "
                f"{self.spec!r} vs {other.spec!r} (same parameters and seed are required)."
            )
        for a, b in other.covered.as_list():
            if self.covered.overlaps(a, b):
                raise IncompatibleMergeError(
                    f"cannot merge {self.family} states: rows [{a}, {b}) are covered by both "
                    "(a block would be counted twice)."
                )
        if other.covered.total == 0:
            return self
        if self.covered.total == 0:
            self._load(other._state())
        else:
            self._merge(other)
        self.covered.union(other.covered)
        return self

    @property
    def n_rows(self) -> int:
        """Number of rows folded into this state."""
        return self.covered.total

    # ------------------------------------------------------------------ serialisation
    def to_state(self) -> State:
        """Plain arrays: family, format version, spec, covered row ranges, state."""
        out: State = {
            "family": np.array(self.family),
            "format_version": np.array(self.format_version, dtype=np.int64),
            "covered": self.covered.to_array(),
        }
        out.update(spec_to_state(self.spec))
        for key, value in self._state().items():
            out[f"state.{key}"] = np.asarray(value)
        return out

    @staticmethod
    def from_state(state: State) -> Operator[Any, Any]:
        """Rebuild any registered operator from ``to_state`` output."""
        try:
            family = str(state["family"])
            version = int(state["format_version"])
            covered = state["covered"]
        except KeyError as exc:
            raise StateFormatError(f"not an operator state: missing {exc}") from exc
        cls = _REGISTRY.get(family)
        if cls is None:
            raise StateFormatError(
                f"unknown operator family {family!r}; known: {sorted(_REGISTRY)}."
            )
        if version != cls.format_version:
            raise StateFormatError(
                f"{family} state has format version {version}; this streamattn reads "
                f"version {cls.format_version}."
            )
        op = cls(spec_from_state(cls.Spec, state))
        op.covered = RowRanges.from_array(covered)
        inner = {k[len("state.") :]: v for k, v in state.items() if k.startswith("state.")}
        if op.covered.total:
            op._load(inner)
        return op

    def copy(self) -> Self:
        """An independent deep copy (through the state round trip)."""
        out = Operator.from_state(self.to_state())
        assert isinstance(out, type(self))
        return out

    # ------------------------------------------------------------------ to implement
    @abstractmethod
    def _update(self, block: Block) -> None:
        """Fold ``block`` into the state (covered ranges are handled by the base)."""

    @abstractmethod
    def _merge(self, other: Self) -> None:
        """Fold a non-empty ``other`` (same spec, disjoint rows) into a non-empty self."""

    @abstractmethod
    def _state(self) -> State:
        """The state arrays (without header); must copy nothing that is later mutated."""

    @abstractmethod
    def _load(self, state: State) -> None:
        """Replace the state by ``state`` (as produced by ``_state``), copying arrays."""

    @abstractmethod
    def result(self) -> ResultT:
        """The final answer for the rows folded so far."""

    @abstractmethod
    def nbytes_bound(self, d: int) -> int:
        """An upper bound on the state's memory for keys of dimension ``d``, any ``n``."""
