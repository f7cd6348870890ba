"""Who counts a request whose client left while its call to a model replica was under way: the caller (the ingress
or the UI replica), when it withdrew the call before any replica took it, or the replica that held it.

Ray 2.60 can still hand a withdrawn call to a replica: the router's assignment task may already have picked one when
the caller's `cancel()` cancels the call's future, and it then sends the call and cancels it there. The caller sees
the call withdrawn and the replica sees it cancelled, and both would count it. So each side claims the call's key in
Ray's key-value store, a put-if-absent in the GCS that only one can win, and only the winner counts it. The loser
deletes the key. A key that one side won alone is deleted FORGET_S later, long after any assignment could still
land, by that process's next claim or when its replica stops (forget_claims); the launcher deletes every key of an
application it deletes (stopping.withdraw_drain).
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
CLAIM_TIMEOUT_S = 2.0  # a GCS that has not answered by then: counted here, as without the store
_claimed: deque[tuple[float, str]] = deque()  # (when to delete, key) of the keys this process won alone
_lock = threading.Lock()


def call_key(app: str, call_id: str) -> str:
    return f"left/{app}/{call_id}"


def claim_left(app: str, call_id: str) -> bool:
    """Whether this process counts the cancelled call `call_id` of application `app` (a blocking GCS call: run it
    off the event loop, bounded by CLAIM_TIMEOUT_S). Without the store (the GCS unreachable or too slow), it does: a
    count twice beats none."""
    key = call_key(app, call_id)
    try:
        kv = kv_store()
        # The client under `_internal_kv_put`, which takes no timeout: 1 if the key was added, 0 if it was there.
        added = kv.internal_kv_get_gcs_client().internal_kv_put(
            key.encode(), b"1", False, NAMESPACE.encode(), timeout=CLAIM_TIMEOUT_S)
        taken = added == 0
    except Exception as err:
        logger.warning("could not ask Ray's key-value store who counts a cancelled call; counting it here",
                       extra={"call_id": call_id, "error": f"{type(err).__name__}: {err}"})
        return True
    # The answer is settled; what follows only tidies the store.
    if taken:  # the other side counted it; neither needs the key any more
        _delete(kv, key)
    else:
        _forget_later(kv, key)
    return not taken


def _forget_later(kv: Any, key: str) -> None:
    now = time.monotonic()
    with _lock:
        _claimed.append((now + FORGET_S, key))
        due = []
        while _claimed and _claimed[0][0] <= now:
            due.append(_claimed.popleft()[1])
    for old in due:
        _delete(kv, old)


def forget_claims() -> None:
    """Delete the keys this process won alone and still keeps (its replica stopping)."""
    with _lock:
        keys = [key for _, key in _claimed]
        _claimed.clear()
    if keys:
        kv = kv_store()
        for key in keys:
            _delete(kv, key)


def _delete(kv: Any, key: str) -> None:
    try:
        kv._internal_kv_del(key, namespace=NAMESPACE)
    except Exception as err:  # left for withdraw_drain; the count was settled already
        logger.debug("could not delete a claim key", extra={"key": key, "error": repr(err)})
