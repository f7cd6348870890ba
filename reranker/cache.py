"""A thread-safe LRU of pair scores keyed by a digest of everything that changes a score."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterable


def pair_key(*parts: str) -> bytes:
    """A 16-byte digest of the parts; length prefixes keep ("ab", "c") apart from ("a", "bc")."""
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        data = part.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.digest()


Entry = tuple[float, int]  # a raw logit, and the engine's flags of how its text was scored


class ScoreCache:
    """Raw logits (with the engine's flags) by pair key; capacity 0 disables it. Digests keep memory flat whatever
    the text size."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[bytes, Entry] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: bytes) -> Entry | None:
        if self.capacity == 0:
            return None
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def absent(self, keys: Iterable[bytes]) -> set[bytes]:
        """Those of `keys` with no entry now; a look that leaves the LRU order as it is."""
        wanted = set(keys)  # made (hashed) before the lock: the scoring threads' gets and puts wait on it
        if self.capacity == 0:
            return wanted
        with self._lock:
            return {key for key in wanted if key not in self._items}

    def put(self, key: bytes, value: Entry) -> None:
        if self.capacity == 0:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
