"""A name -> item registry: an object (never a module global), so tests make fresh ones.

Registering a second, different item under a taken name is refused, naming both
sources; looking up an unknown name lists the candidates.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar

from graphopt.errors import GraphoptError, PluginError, choices

__all__ = ["Registry", "Named"]


class Named(Protocol):
    name: str
    source: str


T = TypeVar("T", bound=Named)


class Registry(Generic[T]):
    def __init__(self, kind: str, unknown_error: type[GraphoptError]) -> None:
        self.kind = kind
        self._unknown_error = unknown_error
        self._items: dict[str, tuple[T, str]] = {}

    def register(self, item: T, origin: str) -> None:
        existing = self._items.get(item.name)
        if existing is not None:
            if existing[0] is item:
                return  # the same module loaded twice: nothing to do
            raise PluginError(
                f"{self.kind} '{item.name}' is registered twice: by {existing[1]} ({existing[0].source}) "
                f"and by {origin} ({item.source})"
            )
        self._items[item.name] = (item, origin)

    def get(self, name: str) -> T:
        try:
            return self._items[name][0]
        except KeyError:
            raise self._unknown_error(
                f"unknown {self.kind} '{name}'; registered {self.kind}s: {choices(self._items)}"
            ) from None

    def origin(self, name: str) -> str:
        return self._items[name][1]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[T]:
        return (self._items[n][0] for n in self.names())

    def __len__(self) -> int:
        return len(self._items)
