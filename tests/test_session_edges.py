"""Session mode's edges that the s13 contract audit's fixes missed (s13 review): a ``sendto``
on a session socket, and a session's creation under a non-blocking timeout or at the end of
the application's timeout. Each test failed on the code before its fix."""

from __future__ import annotations

import socket
import threading

from conftest import ThreadServer, run_py, wait_until

from resilientsock import Relay, ResilientSocket, RetryPolicy


def test_sendto_on_a_session_socket_keeps_the_byte_order():
    """§11 rule 7: a session socket's ``send``/``sendall`` frame straight onto the link, and
    every other write goes through the pair "for good" after switching the direct path off
    (``sendmsg`` did). ``sendto(data, address)`` — journaled as a write on a protected socket
    since the audit (§5) — went through the pair with the direct path still on: the next
    ``send`` overtook it, the upstream got ``a0.c0.a1.c1...`` and the ``b`` writes late
    (measured: 50 rounds of send/sendto/send, out of order every run; plain: in order)."""
    got = bytearray()
    done = threading.Event()
    rounds = 50
    expected = b"".join(b"a%d.b%d.c%d." % (i, i, i) for i in range(rounds))

    def handle(conn: socket.socket, serial: int) -> None:
        conn.settimeout(10)
        try:
            with conn:
                while len(got) < len(expected):
                    data = conn.recv(65536)
                    if not data:
                        break
                    got.extend(data)
        except OSError:
            pass  # (judged by what arrived)
        finally:
            done.set()

    upstream = ThreadServer(handle, once=True)
    try:
        with Relay(("127.0.0.1", 0), upstream.address) as relay:
            app = ResilientSocket.connect(relay.address, RetryPolicy(session=True, deadline=10))
            try:
                app.settimeout(10)
                for i in range(rounds):
                    app.send(b"a%d." % i)
                    assert app.sendto(b"b%d." % i, relay.address) == len(b"b%d." % i)
                    app.send(b"c%d." % i)
                wait_until(done.is_set, 10, "the upstream to read every byte")
            finally:
                app.close()
    finally:
        upstream.close()
    assert bytes(got) == expected


def _refused_address() -> tuple[str, int]:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    address = probe.getsockname()
    probe.close()
    return address


def test_a_non_blocking_session_connect_does_not_wait_the_deadline():
    """§4 "no hang past the application's timeout": ``create_connection(target, timeout=0)``
    (non-blocking) to a session target whose relay is down took the policy's whole deadline
    (measured 4.0 s with deadline=4; 30 s by default) — ``timeout=0`` read as "no timeout".
    Plain python fails at once (BlockingIOError), resilientsock without a session at once
    (the refusal, one attempt). Now one attempt, at once, with the gave-up note."""
    address = _refused_address()
    code = ("import time, resilientsock\n"
            f"resilientsock.patch(session=[{address!r}], deadline=8)\n"
            "import socket\n"
            "start = time.monotonic()\n"
            "try:\n"
            f"    socket.create_connection({address!r}, timeout=0)\n"
            "except ConnectionRefusedError as exc:\n"
            "    print(round(time.monotonic() - start, 1) < 1)\n"
            "    print(exc.__notes__)\n")
    out = run_py(["-c", code], timeout=60)
    assert out.returncode == 0, out.stderr
    took, notes = out.stdout.splitlines()
    assert took == "True", out.stdout
    assert "after 1 attempt in" in notes, notes


def test_a_session_creation_makes_one_last_attempt_not_a_connect_storm():
    """§4 as the first connect does it (``FINAL_MARGIN``): when the next backoff wait
    outlasts the application's timeout, one last attempt just before it ends. A session's
    creation slept until 50 ms before the end and then retried with no wait at all until
    the timeout ran out: 669 refused connects to the relay in the last 50 ms (measured,
    timeout=1; a first connect without a session: 7 attempts)."""
    address = _refused_address()
    code = ("import time, resilientsock\n"
            f"resilientsock.patch(session=[{address!r}], deadline=8)\n"
            "import socket\n"
            "start = time.monotonic()\n"
            "try:\n"
            f"    socket.create_connection({address!r}, timeout=1)\n"
            "except ConnectionRefusedError as exc:\n"
            "    print(round(time.monotonic() - start, 1))\n"
            "    print(exc.__notes__[0])\n")
    out = run_py(["-c", code], timeout=60)
    assert out.returncode == 0, out.stderr
    took, note = out.stdout.splitlines()
    assert 0.9 <= float(took) <= 2.5, out.stdout  # (a loaded machine: slack above)
    attempts = int(note.split(" ran out after ")[1].split(" attempt")[0])
    assert attempts <= 12, note
