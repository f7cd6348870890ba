"""JSON Lines, read one way wherever the service takes them: document uploads and the int8 calibration file."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any


class JsonLineError(ValueError):
    """A line that is not readable JSON: "line N <why>", in words for the person who wrote the file."""

    def __init__(self, number: int, reason: str) -> None:
        super().__init__(f"line {number} {reason}")


def json_lines(text: str) -> Iterator[tuple[int, Any]]:
    """(line number, value) for each line of `text` that is not blank, numbered from 1.

    Lines end at "\\n" (a "\\r" before it is JSON whitespace): not str.splitlines, which also breaks at U+2028, U+0085
    and form feeds, which a JSON string may hold unescaped. Raises JsonLineError naming the line that is not JSON,
    nests deeper than Python's parser goes, or holds a number past Python's 4,300-digit limit.
    """
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except RecursionError:
            raise JsonLineError(number, "nests too deeply to read; flatten it") from None
        except json.JSONDecodeError:
            raise JsonLineError(number, "is not valid JSON") from None
        except ValueError:  # int() of a number past sys.get_int_max_str_digits()
            raise JsonLineError(number, "holds a number of over 4,300 digits; write it as a string") from None
