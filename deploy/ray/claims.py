"""Who counts a request whose client left while its call to a model replica was under way: the caller (the ingress
or the UI replica), when it withdrew the call before any replica took it, or the replica that held it.

Ray 2.60 can still hand a withdrawn call to a replica: the router's assignment task may already have picked one when
the caller's `cancel()` cancels the call's future, and it then sends the call and cancels it there. The caller saw
the call withdrawn and the replica saw it cancelled, so both counted it (2 of 24 cancelled requests in a review's
run). Each side now claims the call's key in Ray's key-value store, a put-if-absent in the GCS that only one can
win, and only the winner counts it. The loser deletes the key; a key that only one side claimed is deleted once
FORGET_S have passed, long after any assignment could still land, by the next claim in that process, and every key
of an application when the launcher deletes it (stopping.withdraw_drain).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

from deploy.ray.stopping import NAMESPACE, kv_store

logger = logging.getLogger("reranker.ray")

FORGET_S = 60.0
_claimed: deque[tuple[float, str]] = deque()  # (when to delete, key) of the keys this process won alone
_lock = threading.Lock()


def call_key(app: str, call_id: str) -> str:
    return f"left/{app}/{call_id}"


def claim_left(app: str, call_id: str) -> bool:
    """Whether this process counts the cancelled call `call_id` of application `app` (a blocking GCS call: run it
    off the event loop). Without the store (the GCS unreachable), it does: a count twice beats none."""
    key = call_key(app, call_id)
    try:
        kv = kv_store()
        taken = kv._internal_kv_put(key, b"1", overwrite=False, namespace=NAMESPACE)
        if taken:  # the other side counted it; neither needs the key any more
            kv._internal_kv_del(key, namespace=NAMESPACE)
        else:
            _forget_later(kv, key)
        return not taken
    except Exception as err:
        logger.warning("could not ask Ray's key-value store who counts a cancelled call; counting it here",
                       extra={"call_id": call_id, "error": f"{type(err).__name__}: {err}"})
        return True


def _forget_later(kv: Any, key: str) -> None:
    now = time.monotonic()
    with _lock:
        _claimed.append((now + FORGET_S, key))
        due = []
        while _claimed and _claimed[0][0] <= now:
            due.append(_claimed.popleft()[1])
    for old in due:
        kv._internal_kv_del(old, namespace=NAMESPACE)

