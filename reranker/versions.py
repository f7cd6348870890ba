"""Installed package versions, for /info, the start-up log line and the conversion cache's key."""

from __future__ import annotations

from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version


def installed(names: Iterable[str], missing: str = "not installed") -> dict[str, str]:
    """Each distribution's installed version, or `missing`."""
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = missing
    return out
