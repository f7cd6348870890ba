"""Copied in as `sitecustomize` by tests/test_no_network.py: log every socket destination, refuse non-loopback.

With NETAUDIT_LOG set, an audit hook appends one JSON line per event to that file: `{"pid", "event",
"address", "local"}`, starting with a `start` line so that a test can show the hook ran in the process it
watched. Connects, datagrams and name lookups that are not loopback (127.0.0.0/8, ::1, localhost) or a
UNIX socket are refused with PermissionError after they are logged, so nothing ever leaves the machine.
Without NETAUDIT_LOG, importing this module does nothing.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import sys
from typing import Any

SEND_EVENTS = ("socket.connect", "socket.sendto", "socket.sendmsg")
LOOKUP_EVENTS = ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo")


def is_local_host(host: Any) -> bool:
    if host is None:  # getaddrinfo(None, port): the local wildcard, no lookup
        return True
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    host = str(host).strip("[]")
    if host in ("localhost", "ip6-localhost", "ip6-loopback"):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def is_local(event: str, args: tuple[Any, ...]) -> bool:
    if event in SEND_EVENTS:
        sock, address = args[0], args[1]
        if getattr(socket, "AF_UNIX", None) is not None and sock.family == socket.AF_UNIX:
            return True
        return isinstance(address, tuple) and is_local_host(address[0])
    address = args[0]
    return is_local_host(address[0] if isinstance(address, tuple) else address)


def install(log: str) -> None:
    def record(entry: dict[str, Any]) -> None:
        with open(log, "a", encoding="utf-8") as out:
            out.write(json.dumps(entry, default=repr) + "\n")

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event not in SEND_EVENTS and event not in LOOKUP_EVENTS:
            return
        local = is_local(event, args)
        address = args[1] if event in SEND_EVENTS else args[0]
        record({"pid": os.getpid(), "event": event, "address": address, "local": local})
        if not local:
            raise PermissionError(f"connect_audit: {event} to {address!r} refused (not loopback)")

    record({"pid": os.getpid(), "event": "start", "address": None, "local": True})
    sys.addaudithook(hook)


if os.environ.get("NETAUDIT_LOG"):
    install(os.environ["NETAUDIT_LOG"])
