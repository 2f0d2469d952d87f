"""A name → class registry, so upper layers find methods, formats and adapters without
lower layers importing upward."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from compressor.errors import CompressorError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, names_items: bool = False):
        self.kind = kind
        self.names_items = names_items  # registering a class sets its `name` to the registered one
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            if self.names_items:
                item.name = name
            self._items[name] = item
            return item

        return add

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise CompressorError(
                f"unknown {self.kind} {name!r}", f"choose one of: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())

    def __contains__(self, name: str) -> bool:
        return name in self._items
