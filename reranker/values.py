"""Parsers of one configuration value: (variable name, its text) -> the value, or SettingsError saying what to use."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")

DEVICES = ("auto", "cpu", "cuda", "cuda:N")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class SettingsError(ValueError):
    """A configuration variable has a value the service cannot use."""


def is_url(raw: str) -> bool:
    """Whether `raw` is an http(s) URL with a host and, if it names one, a port."""
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018  # raises ValueError for a port that is not one
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def is_grpc_target(raw: str) -> bool:
    """Whether `raw` is a target as gRPC itself writes one: host:port (TLS unless OTEL_EXPORTER_OTLP_INSECURE=true,
    as the exporter decides) or a unix: socket."""
    return raw.startswith("unix:") or ("://" not in raw and is_url(f"http://{raw}"))


def number(raw: str) -> float:
    """`raw` as a number; NaN (which no bound admits) when it is not one."""
    try:
        return float(raw)
    except ValueError:
        return math.nan


def text(name: str, raw: str) -> str:
    return raw


def model_id(name: str, raw: str) -> str:
    """A hub id as given; a local directory under `~` expanded, as RERANKER_CACHE_DIR is (no hub id starts so)."""
    return path(name, raw) if raw.startswith("~") else raw


def path(name: str, raw: str) -> str:
    try:
        return str(Path(raw).expanduser())
    except RuntimeError:  # `~` with no home directory, or `~name` for no such user
        head = raw.split("/")[0]
        who = "this user has no home directory" if head == "~" else f"no user {head[1:]!r} has a home directory"
        raise SettingsError(f"{name}={raw!r} is not valid: {who} for {head!r}; use an absolute path") from None


def calibration(name: str, raw: str) -> str:
    """A calibration file that exists and can be read; its lines are checked where it is used."""
    file = path(name, raw)
    try:
        with open(file, "rb") as f:
            f.read(1)
    except OSError as err:
        raise SettingsError(f"{name}={raw!r} cannot be read ({err.strerror or err}); name a UTF-8 file of JSON "
                            'lines {"query": "...", "document": "..."}') from None
    return file


def choice(choices: tuple[str, ...]) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        value = raw.lower()
        if value not in choices:
            raise SettingsError(f"{name}={raw!r} is not valid; use one of: {', '.join(choices)}")
        return value

    return parse


def device(name: str, raw: str) -> str:
    value = raw.lower()
    if value in ("auto", "cpu", "cuda"):
        return value
    prefix, _, index = value.partition(":")
    if prefix == "cuda" and index.isascii() and index.isdigit():  # "²" is a digit to isdigit, and no index
        return value
    raise SettingsError(f"{name}={raw!r} is not valid; use one of: {', '.join(DEVICES)} (N = GPU index)")


def integer(minimum: int) -> Callable[[str, str], int]:
    def parse(name: str, raw: str) -> int:
        try:
            if not raw.isascii():  # int() takes any script's digits: "٣" is 3
                raise ValueError(raw)
            value = int(raw)
        except ValueError:
            raise SettingsError(f"{name}={raw!r} is not valid; use an integer >= {minimum}") from None
        if value < minimum:
            raise SettingsError(f"{name}={raw!r} is not valid; use an integer >= {minimum}")
        return value

    return parse


def auto_or(parse: Callable[[str, str], T]) -> Callable[[str, str], T | None]:
    def parse_auto(name: str, raw: str) -> T | None:
        if raw.lower() == "auto":
            return None
        try:
            return parse(name, raw)
        except SettingsError as err:
            raise SettingsError(f"{err} or auto") from None

    return parse_auto


def port(name: str, raw: str) -> int:
    try:
        value = integer(0)(name, raw)
    except SettingsError:
        value = -1
    if not 0 <= value <= 65535:
        raise SettingsError(f"{name}={raw!r} is not valid; use a port number from 0 to 65535")
    return value


def off_or_at_least(low: float) -> Callable[[str, str], float]:
    """0 (off) or a number of seconds from `low`: a watchdog of 0.001 s took the first real pass for a hung device."""
    accepted = f"0 (off) or a number of seconds >= {low:g}"
    seconds = bounded(0.0, sys.float_info.max, accepted)

    def parse(name: str, raw: str) -> float:
        value = seconds(name, raw)
        if 0 < value < low:
            raise SettingsError(f"{name}={raw!r} is not valid; use {accepted}")
        return value

    return parse


def boolean(name: str, raw: str) -> bool:
    value = raw.lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name}={raw!r} is not valid; use one of: true, false, 1, 0, yes, no, on, off")


def log_level(name: str, raw: str) -> str:
    value = raw.upper()
    if value not in LOG_LEVELS:
        raise SettingsError(f"{name}={raw!r} is not valid; use one of: {', '.join(LOG_LEVELS)}")
    return value


def bounded(low: float, high: float, accepted: str) -> Callable[[str, str], float]:
    def parse(name: str, raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        if not low <= value <= high:  # NaN fails too
            raise SettingsError(f"{name}={raw!r} is not valid; use {accepted}")
        return value

    return parse


non_negative = bounded(0.0, sys.float_info.max, "a number >= 0")  # finite, too
ratio = bounded(0.0, 1.0, "a number from 0 to 1")
