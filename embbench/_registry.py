"""A small generic registry with did-you-mean errors (the timm / mteb pattern)."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from embbench._errors import UserError

T = TypeVar("T")


class UnknownNameError(UserError, KeyError):
    """Raised for a name that is not registered; the message suggests close matches."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


def did_you_mean(name: str, choices: list[str] | tuple[str, ...], what: str) -> str:
    """Format an "unknown X" message with the closest registered names.

    Args:
        name: The name that was asked for.
        choices: The registered names.
        what: What kind of thing it is, e.g. ``"model"``.

    Returns:
        A one-line message naming the value, close matches and where to see all choices.
    """
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    shown = ", ".join(sorted(choices)[:40])
    more = "" if len(choices) <= 40 else f", ... ({len(choices)} in all)"
    return f"Unknown {what} {name!r}.{hint} Known {what}s: {shown}{more}."


class Registry(Generic[T]):
    """A name -> entry mapping that fails loudly, with suggestions, on unknown names.

    Args:
        what: What the entries are, used in error messages (e.g. ``"dataset"``).
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T, *, overwrite: bool = False) -> T:
        """Add ``entry`` under ``name``; refuse to shadow an existing name unless asked."""
        if name in self._entries and not overwrite:
            raise ValueError(f"{self.what} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def decorator(self, name: str) -> Callable[[T], T]:
        """Register the decorated object under ``name``."""

        def wrap(obj: T) -> T:
            self.register(name, obj)
            return obj

        return wrap

    def get(self, name: str) -> T:
        """Return the entry for ``name`` or raise :class:`UnknownNameError` with suggestions."""
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(did_you_mean(name, list(self._entries), self.what)) from None

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
