"""One registry type for every "choose by name" concept: blocks, objectives, samplers, metrics.

Each registry is filled from an explicit list where its classes are defined (no import side effects), and
each class carries its own ``name``. Adding a variant is one class plus one line in that list:

    BLOCKS = Registry("block", [AdaLNZeroBlock, AdaLNBlock, ...])

A lookup of an unknown name fails with one line naming the kind, the value and the valid names.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

__all__ = ["Registry"]


class Registry(Generic[T]):
    """Name -> class, in registration order. Each entry's ``name`` attribute is its key."""

    def __init__(self, kind: str, entries: Iterable[type[T]] = ()) -> None:
        self.kind = kind
        self._entries: dict[str, type[T]] = {}
        for cls in entries:
            self.add(cls)

    def add(self, cls: type[T]) -> type[T]:
        """Register ``cls`` under ``cls.name`` (also usable as a class decorator, e.g. in a test or plugin)."""
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"{cls.__qualname__} has no `name`: a {self.kind} class names itself")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = cls
        return cls

    def remove(self, name: str) -> None:
        """Unregister ``name`` (for tests that register a temporary entry)."""
        del self._entries[name]

    def __getitem__(self, name: str) -> type[T]:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ValueError(
                f"unknown {self.kind} {name!r}; valid {self.kind}s: {', '.join(sorted(self._entries))}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def items(self):
        return self._entries.items()

    def values(self):
        return self._entries.values()

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"
