"""socket.create_connection(..., all_errors=True) under patch(): after our retries, an
ExceptionGroup with one error per address of the last attempt, as the stdlib raises (3.11+)."""
import socket
import sys

import resilientsock

resilientsock.patch(deadline=0.3, backoff_initial=0.01, backoff_max=0.05)
probe = socket.socket()
probe.bind(("127.0.0.1", 0))
port = probe.getsockname()[1]
probe.close()  # nothing listens there now: every connect is refused

try:
    socket.create_connection(("localhost", port))
except ConnectionRefusedError as exc:
    assert any("gave up" in n for n in exc.__notes__), exc.__notes__
    print("plain: ConnectionRefusedError")

if sys.version_info >= (3, 11):
    addresses = socket.getaddrinfo("localhost", port, 0, socket.SOCK_STREAM)
    try:
        socket.create_connection(("localhost", port), all_errors=True)
    except ExceptionGroup as group:  # noqa: F821
        assert len(group.exceptions) == len(addresses), (group.exceptions, addresses)
        assert all(isinstance(e, ConnectionRefusedError) for e in group.exceptions)
        assert any("gave up" in n for n in group.__notes__), group.__notes__
        print(f"all_errors: ExceptionGroup of {len(group.exceptions)}")
else:
    print("all_errors: not on this version")
