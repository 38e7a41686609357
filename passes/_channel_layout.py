"""Where the channels go through a layout change (used by :mod:`graphopt.passes._channel_groups`).

A tracked tensor carries its channels on exactly one axis (1 for NCHW, the last one after a
channels-last ``permute``); the batch stays on axis 0. Each function returns the axis the
channels are on after the op, or None when the op moves the batch, splits the channel axis,
or merges it with a *preceding* axis (the channels would then interleave with another
dimension): the caller blocks those. Merging the channel axis with the axes after it is
followed: each channel becomes ``repeat`` consecutive elements (flatten into a Linear).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["flattened", "moved", "reduced", "reshaped"]


def _dim(value: Any, rank: int) -> int | None:
    return value % rank if isinstance(value, int) and -rank <= value < rank else None


def moved(name: str, args: tuple, kwargs: dict, rank: int, axis: int) -> int | None:
    """The channel axis after ``permute``/``transpose``/``unsqueeze``/``squeeze`` (batch stays at 0)."""
    if name == "permute":
        dims = list(args[1:]) if len(args) > 2 else args[1] if len(args) > 1 else kwargs.get("dims")
        perm = [_dim(d, rank) for d in dims] if isinstance(dims, (list, tuple)) else None
        if perm is None or sorted(perm) != list(range(rank)) or perm[0] != 0:
            return None
        return perm.index(axis)
    if name == "transpose":
        pair = [_dim(args[k] if len(args) > k else kwargs.get(key), rank) for k, key in ((1, "dim0"), (2, "dim1"))]
        if None in pair or 0 in pair:
            return None
        a, b = pair
        return b if axis == a else a if axis == b else axis
    d = args[1] if len(args) > 1 else kwargs.get("dim")
    if name == "unsqueeze":
        d = _dim(d, rank + 1)
        return None if not d else axis + (d <= axis)
    d = _dim(d, rank)  # squeeze: only a named, non-batch, non-channel dimension
    return None if not d or d == axis else axis - (d < axis)


def flattened(shape: tuple[int, ...], start: int, end: int, axis: int) -> tuple[int, int] | None:
    """``(axis, repeat)`` after ``flatten(start, end)`` of a tensor of ``shape``."""
    rank = len(shape)
    start, end = start % rank, end % rank
    if axis < start:
        return axis, 1
    if axis > end:
        return axis - (end - start), 1
    if start != axis:  # the batch or a preceding axis would interleave with the channels
        return None
    return axis, math.prod(shape[axis + 1 : end + 1])


def reshaped(shape: tuple[int, ...], out: tuple[int, ...], axis: int) -> tuple[int, int] | None:
    """``(axis, repeat)`` after a view/reshape from ``shape`` to ``out``, when the channel axis maps
    onto one output axis (alone, or merged with the axes right after it); None otherwise."""
    before, c = math.prod(shape[:axis]), shape[axis]
    found = []
    for j in range(1, len(out)):
        if math.prod(out[:j]) != before or out[0] != shape[0] or out[j] % c:
            continue
        repeat = out[j] // c
        inner = [math.prod(shape[axis + 1 : m]) for m in range(axis + 1, len(shape) + 1)]
        if repeat in inner:
            found.append((j, repeat))
    return found[0] if len(found) == 1 else None


def reduced(dims: list[int] | None, rank: int, axis: int, keepdim: bool) -> int | None:
    """The channel axis after a reduction over ``dims`` (None: it reduces the batch or the channels)."""
    if dims is None or 0 in dims or axis in dims:
        return None
    return axis if keepdim else axis - sum(d < axis for d in dims)
