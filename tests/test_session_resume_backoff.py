"""The session client's resume schedule restarts once an attempt reaches the relay's path
after attempts that found nobody, as RetryPolicy's schedule does for a plain reconnect: a
backoff grown during an outage must not outlast the application's own timeout once the path
is back (`make demo` under load: the robot's 5 s read timeout ran out, 373 readings lost)."""

from __future__ import annotations

from collections.abc import Callable

import gevent
from conftest import wait_until

from resilientsock import RetryPolicy
from resilientsock.session import Relay, open_session
from resilientsock.testing import FaultProxy, MessageServer


class CeilingBackoff(RetryPolicy):
    """Every wait at its ceiling (no jitter), so the schedule is known."""

    def backoff(self, attempt: int, rand: Callable[[], float] = lambda: 1.0) -> float:
        return super().backoff(attempt, rand=lambda: 1.0)


def readline(sock: object, limit: int = 100) -> bytes:
    data = b""
    while not data.endswith(b"\n") and len(data) < limit:
        chunk = sock.recv(1)  # type: ignore[attr-defined]
        if not chunk:
            break
        data += chunk
    return data


def test_a_resume_that_meets_the_relay_after_refusals_restarts_the_schedule() -> None:
    # Waits at their ceilings: 0, 0.4, 0.8, 1.6, 3.2 s ... for attempts 0, 1, 2, 3, 4.
    policy = CeilingBackoff(deadline=60, backoff_initial=0.4, backoff_multiplier=2,
                            backoff_max=20)
    with MessageServer() as upstream, \
            Relay(("127.0.0.1", 0), upstream.address, plain_after=5.0) as relay, \
            FaultProxy(relay.address) as proxy:
        app = open_session(proxy.address, timeout=10, policy=policy, heartbeat=10)
        try:
            app.sendall(b"MSG 1 x\n")
            assert readline(app) == b"ACK 1\n"
            accepted = proxy.connections
            proxy.refuse_now()  # the relay's path is gone: attempts 0, 1, 2 are refused
            proxy.reset_all()
            gevent.sleep(1.5)  # the outage's length (a fault schedule, not synchronisation)
            proxy.blackhole(True)  # attempt 3 (at 2.8 s) connects; its handshake vanishes
            proxy.accept_again()
            wait_until(lambda: proxy.connections > accepted, timeout=10,
                       what="a resume attempt through the proxy")
            proxy.blackhole(False)
            proxy.reset_all()  # that attempt met the path: the outage is over
            # The next attempt waits its schedule's first step (0.4 s), not attempt 4's
            # 3.2 s: the application's 2 s read timeout is not exceeded.
            app.settimeout(2.0)
            app.sendall(b"MSG 2 x\n")
            assert readline(app) == b"ACK 2\n"
            assert upstream.received == [1, 2] and upstream.connections == 1
        finally:
            app.close()
