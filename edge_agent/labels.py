"""Labels as the data spells them, and their class indices for one job's model.

A data file keeps its raw labels: integers (``0``, ``3``) or strings (``setosa``). They are
held as int64 *codes* plus an optional tuple of *names*: without names a code is the
integer label itself; with names, code ``c`` is the raw label ``names[c]`` (names sorted,
distinct). Only at task start are they mapped to the class indices of the job's model
(``to_classes``): with ``spec.labels`` set, a raw label is its index in that list; without,
it must be an integer in ``0..n_classes-1``. A label that does not map is a
``DataError("labels")``, never an ``IndexError`` in a trainer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from edge_agent.errors import DataError

Labels = npt.NDArray[np.int64]
Names = tuple[str, ...]
MAX_LABEL_CHARS = 256  # a class name on the wire (StatsReport keys, ModelSpecMsg.labels)


def _integers(values: npt.NDArray[np.float64]) -> bool:
    return bool(np.all(np.isfinite(values)) and np.all(values == np.round(values)))


def parse_labels(raw: npt.ArrayLike) -> tuple[Labels, Names | None]:
    """Codes and names of raw labels. Non-negative integers (also spelled ``3.0`` or as
    floats) stay integers (no names); anything else (``setosa``, ``-1``, ``0.5``) becomes a
    name, so every label of the column is then a name."""
    arr = np.asarray(raw)
    if arr.ndim != 1:
        raise DataError("labels", f"labels must be one column, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, np.int64), None
    kind = arr.dtype.kind
    if kind == "b":
        return arr.astype(np.int64), None
    if kind in "iuf":
        num = arr.astype(np.float64)
        if _integers(num) and num.min() >= 0:
            return num.astype(np.int64), None
        text = np.array([_spell(v) for v in arr.tolist()], dtype=str)
    elif kind in "US":
        text = np.char.strip(arr.astype(str))
        try:
            num = text.astype(np.float64)
        except ValueError:
            num = None
        if num is not None and _integers(num) and num.min() >= 0:
            return num.astype(np.int64), None
    else:
        raise DataError("labels", f"labels must be integers or strings, not {arr.dtype}")
    names, codes = np.unique(text, return_inverse=True)
    return codes.astype(np.int64).reshape(-1), tuple(str(n) for n in names.tolist())


def _spell(value: float | int) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def spell(code: int, names: Names | None) -> str:
    """The raw label of ``code`` as the data spells it."""
    return names[code] if names is not None else str(code)


def raw_label_counts(codes: Labels, names: Names | None) -> dict[str, int]:
    """Rows per raw label (``{"3": 12, "setosa": 4}``)."""
    if codes.size == 0:
        return {}
    uniq, counts = np.unique(codes, return_counts=True)
    return {spell(int(c), names): int(n) for c, n in zip(uniq, counts, strict=True)}


def _class_of(raw: str, *, n_classes: int, index: dict[str, int]) -> int:
    if index:
        return index.get(raw, -1)
    try:
        value = float(raw)
    except ValueError:
        return -1
    if not value.is_integer() or not 0 <= value < n_classes:
        return -1
    return int(value)


def to_classes(
    codes: Labels, names: Names | None, *, n_classes: int, labels: Sequence[str] = ()
) -> Labels:
    """Class indices of the rows for a model with ``n_classes`` classes named ``labels``
    (empty: the integers ``0..n_classes-1``). ``DataError("labels")`` names the first raw
    label that is not one of the model's classes."""
    if codes.size == 0:
        return np.zeros(0, np.int64)
    uniq, inverse = np.unique(codes, return_inverse=True)
    if names is None and not labels:  # the common case, vectorised
        top = int(uniq[-1])
        if top >= n_classes:
            raise DataError("labels", f"label {top} is outside the job's {n_classes} classes "
                                      f"(0..{n_classes - 1})")  # fmt: skip
        return codes.astype(np.int64, copy=True)
    index = {name: i for i, name in enumerate(labels)}
    table = np.empty(len(uniq), np.int64)
    for j, code in enumerate(uniq.tolist()):
        raw = spell(int(code), names)
        cls = _class_of(raw, n_classes=n_classes, index=index)
        if cls < 0:
            known = ", ".join(repr(x) for x in labels[:8]) + (", ..." if len(labels) > 8 else "")
            where = f"the job's classes ({known})" if labels else (
                f"the job's {n_classes} classes (0..{n_classes - 1}; the job names no "
                "classes, so labels must be integers)"
            )  # fmt: skip
            raise DataError("labels", f"label {raw[:40]!r} is not one of {where}")
        table[j] = cls
    out: Labels = table[inverse.reshape(-1)]
    return out


def class_names(labels: Sequence[str], n_classes: int) -> list[str]:
    """What a prediction of class ``i`` prints: ``labels[i]``, or ``str(i)``."""
    return list(labels) if labels else [str(i) for i in range(n_classes)]
