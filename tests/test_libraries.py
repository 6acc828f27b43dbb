"""Which sockets a retrying client library owns is decided when the socket connects, never by
walking the stack at error time (docs/design.md §4, §9; resilientsock/_libraries.py). Real clients,
real servers, under the runner. Repro: ../shared/repro/wave3/w8_heuristic_misfires_in_callback."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from test_peer_rules import SHORT_DEADLINE, run_client

pytestmark = pytest.mark.timeout(120)

CALLBACK = r"""
import json, socket, sys
import gevent, redis
port = int(sys.argv[1])
r = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
r.ping()
probe = socket.socket(); probe.bind(("127.0.0.1", 0)); svc = probe.getsockname()[1]; probe.close()

def serve_later():
    gevent.sleep(0.5)  # the fault: the service is down now and up half a second later
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", svc)); ls.listen(1)
    c, _ = ls.accept(); c.sendall(c.recv(100).upper()); c.close(); ls.close()

out = []
def func(pipe):
    g = gevent.spawn(serve_later)
    try:
        c = socket.create_connection(("127.0.0.1", svc), timeout=10)
        c.sendall(b"notify\n"); out.append(c.recv(100).decode()); c.close()
    except Exception as e:
        out.append(type(e).__name__)
    g.kill()
    pipe.multi(); pipe.set("k", "v")

r.transaction(func)
print(json.dumps({"inside": out[0], "k": r.get("k").decode()}))
"""


def test_application_code_called_back_from_inside_redis_keeps_its_connect_retry(
        tmp_path: Path, redis_server) -> None:
    """w8: ``r.transaction(func)`` runs application code inside redis-py; a connection that
    code opens to an unrelated server is the application's, so its first connect is retried
    (the server is up 0.5 s later) instead of being left to redis-py's retries."""
    _, port = redis_server
    got = run_client(tmp_path, "resilientsock", CALLBACK, port, env=SHORT_DEADLINE)
    assert got == {"inside": "NOTIFY\n", "k": "v"}, got


def test_no_stack_walking_in_the_package() -> None:
    root = Path(__file__).resolve().parent.parent / "resilientsock"
    found = subprocess.run(["grep", "-r", "_getframe", str(root)], capture_output=True,
                           text=True)
    assert found.stdout == "", found.stdout
