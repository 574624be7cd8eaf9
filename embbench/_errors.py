"""The base of every error a user can fix: a bad params file, a missing dataset, a busy cache.

This module sits at the bottom of the package (it imports nothing from embbench). Each
user-fixable error class derives from :class:`UserError` as well as from its built-in base
(``ValueError``, ``OSError``...), so ``except ValueError`` callers keep working while the CLI
catches :class:`UserError` by class and prints its message (exit status 2, no traceback).
"""

from __future__ import annotations

__all__ = ["UserError", "user_error_names"]


class UserError(Exception):
    """An error whose message tells the user what to fix; the CLI exits 2 with that one line."""


def user_error_names() -> frozenset[str]:
    """The names of every :class:`UserError` subclass defined so far (imported modules only).

    A notebook's exception reaches the CLI through papermill by class name only, so the CLI
    compares that name with these.
    """
    names: set[str] = set()
    todo: list[type] = [UserError]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            if sub.__name__ not in names:
                names.add(sub.__name__)
                todo.append(sub)
    return frozenset(names)
