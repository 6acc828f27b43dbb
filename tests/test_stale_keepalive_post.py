"""A POST written whole to a keep-alive connection the server had already closed (its FIN was
in before the write) is re-sent: an HTTP/1.x server never reads after its FIN, so it never
ran it (docs/design.md §5, half-close; ``Dialect.fin_is_final``).

Was (wave 5, found by a loaded run of test_never_worse_legacy's stale keep-alive test): the
EOF was passed on with "POST may have reached the server", as plain http.client's
``RemoteDisconnected``. Only when the write itself met the server's reset (the request's head
and body in two writes, the reset in before the second) was it re-sent; on a busy machine the
reset came after both writes, and which of the two a user saw depended on the scheduler.
One write here makes the EOF path the only one.
"""

from __future__ import annotations

import select

import pytest
from conftest import CountingServer
from test_never_worse_legacy import _ClosingHTTP

from resilientsock import ResilientSocket, RetryPolicy

pytestmark = pytest.mark.timeout(30)


def _post(path: str) -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\ndata" % path.encode())


def _answer(sock: ResilientSocket) -> bytes:
    """One answer (the server's are 'HTTP/1.1 200 OK' + Content-Length), or b'' at EOF."""
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = sock.recv(4096)
        if not chunk:
            return got
        got += chunk
    head, body = got.split(b"\r\n\r\n", 1)
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def test_a_post_written_after_the_servers_fin_is_re_sent_and_runs_once() -> None:
    with CountingServer(_ClosingHTTP) as server:
        sock = ResilientSocket.connect(server.server_address, RetryPolicy(deadline=10),
                                       timeout=10)
        try:
            for i in range(3):
                sock.sendall(_post(f"/r{i}"))  # one write: head and body together
                answer = _answer(sock)
                assert answer.endswith(b"POST /r%d" % i), (i, answer)
                # Idle until the server's FIN is here (it closes after each answer), as a
                # client that idles past the server's keep-alive timeout does.
                assert select.select([sock], [], [], 5)[0], "no FIN from the server"
        finally:
            sock.close()
    assert dict(server.counts) == {"POST /r0": 1, "POST /r1": 1, "POST /r2": 1}
    assert sock.reconnects == 2
