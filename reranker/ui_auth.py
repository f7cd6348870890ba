"""RERANKER_UI_AUTH's login pairs, given inline or in a file."""

from __future__ import annotations

from pathlib import Path

from reranker.values import SettingsError

UI_AUTH_ACCEPTED = ("use user:password, several pairs separated by commas, or the path of a file with one "
                    "user:password per line (blank lines and # comments ignored)")


def login_pairs(name: str, raw: str) -> tuple[tuple[str, str], ...]:
    """Login pairs from `user:password,...` or from a file. Errors never repeat a password."""
    # A value with no ':' or one that looks like a path is a file; `user:pa/ss` is still a pair.
    if ":" not in raw or raw.startswith(("/", "./", "../", "~")):
        return _from_file(name, raw)
    return _unique(name, [_pair(name, item.strip(), f"pair {n}") for n, item in enumerate(raw.split(","), 1)], "")


def _from_file(name: str, raw: str) -> tuple[tuple[str, str], ...]:
    path = Path(raw).expanduser()
    # Without a '/' the value may be a pair whose ':' was forgotten, i.e. a password: do not repeat it.
    shown = repr(raw) if "/" in raw else "the value"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else "not a readable UTF-8 file"
        raise SettingsError(f"{name}: {shown} is not user:password pairs and cannot be read as a file "
                            f"({reason}); {UI_AUTH_ACCEPTED}") from None
    pairs = [_pair(name, line.strip(), f"{raw!r} line {n}") for n, line in enumerate(lines, 1)
             if line.strip() and not line.strip().startswith("#")]
    if not pairs:
        raise SettingsError(f"{name}: file {raw!r} has no user:password line; {UI_AUTH_ACCEPTED}")
    return _unique(name, pairs, f" in {raw!r}")


def _pair(name: str, item: str, where: str) -> tuple[str, str]:
    user, colon, password = item.partition(":")
    if not colon or not user or not password:
        problem = "is empty" if not item else "needs a user name, ':' and a non-empty password"
        raise SettingsError(f"{name}: {where} {problem}; {UI_AUTH_ACCEPTED}")
    if any(c.isspace() for c in user):
        raise SettingsError(f"{name}: {where} has a space in the user name; {UI_AUTH_ACCEPTED}")
    if password != password.strip():  # `alice: pw` is more likely a typo than a password with a space
        raise SettingsError(f"{name}: {where} has a password that starts or ends with a space; "
                            f"{UI_AUTH_ACCEPTED}")
    return user, password


def _unique(name: str, pairs: list[tuple[str, str]], where: str) -> tuple[tuple[str, str], ...]:
    users = [user for user, _ in pairs]
    twice = sorted({user for user in users if users.count(user) > 1})
    if twice:
        listed = ", ".join(map(repr, twice))
        raise SettingsError(f"{name}: user {listed} is listed twice{where}; {UI_AUTH_ACCEPTED}")
    return tuple(pairs)
