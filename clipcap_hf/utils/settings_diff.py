"""The settings that differ between two records of them (a captioning run's run file, an embeddings folder's tower
settings), each worded by the caller: one walk over nested dicts for every refusal that names what changed."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any


class _Absent:
    def __repr__(self) -> str:
        return "ABSENT"


ABSENT = _Absent()
"""What [`changed_settings`] gives `describe` for a key that one record lacks (None is a value a record may hold)."""


def changed_settings(
    before: Mapping[str, Any],
    after: Mapping[str, Any],
    describe: Callable[[str, Any, Any], str],
    *,
    shared_only: bool = False,
    skip: Callable[[str], object] | None = None,
    prefix: str = "",
) -> list[str]:
    """
    Each setting whose value differs between `before` and `after`, in the order of their keys, as
    `describe(name, before_value, after_value)` words it. Nested dicts are compared key by key, a nested setting named
    by its keys joined with dots (`source.data_files`).

    Args:
        before, after: the settings, as dicts that may nest.
        describe: words one difference; a key that one side lacks is given to it as [`ABSENT`].
        shared_only: compare only the keys both sides hold (a key added or removed is no difference).
        skip: leaves out each key (at any depth, tested by its own name, not its dotted one) for which it is true.
        prefix: put before every name (the dotted keys of the dict that holds these).
    """
    keys = before.keys() & after.keys() if shared_only else before.keys() | after.keys()
    changes: list[str] = []
    for key in sorted(keys):
        if skip is not None and skip(key):
            continue
        old, new = before.get(key, ABSENT), after.get(key, ABSENT)
        if isinstance(old, dict) and isinstance(new, dict):
            nested = f"{prefix}{key}."
            changes += changed_settings(old, new, describe, shared_only=shared_only, skip=skip, prefix=nested)
        elif old is ABSENT or new is ABSENT or old != new:
            changes.append(describe(f"{prefix}{key}", old, new))
    return changes


__all__ = ["ABSENT", "changed_settings"]
