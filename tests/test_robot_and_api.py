"""The robot loop of the core issue, the public API, the demo and the examples."""

from __future__ import annotations

from conftest import ROOT, RandomResets, assert_in_order_no_loss, run_py

import resilientsock
from resilientsock import ResilientSocket, RetryPolicy
from resilientsock.testing import FaultProxy


def test_robot_loop_2000_messages_through_random_resets(server):
    policy = RetryPolicy(deadline=10, backoff_initial=0.01, backoff_max=0.1)
    with FaultProxy(server.address) as proxy:
        sock = ResilientSocket.connect(proxy.address, policy, timeout=10)
        with sock, sock.makefile("rb") as reader, RandomResets(proxy, seed=42) as resets:
            for n in range(1, 2001):
                if n == 1000:
                    resets.at_least(1)
                sock.sendall(b"MSG %d reading\n" % n)
                assert reader.readline() == b"ACK %d\n" % n
    got = server.received
    assert_in_order_no_loss(got, 2000)
    duplicates = len(got) - 2000
    print(f"\nrobot loop: {proxy.faults['reset']} resets, {sock.reconnects} reconnects, "
          f"{duplicates} duplicates")
    assert proxy.faults["reset"] >= 1 and sock.reconnects >= 1
    assert duplicates <= sock.reconnects  # at most one re-sent record per reconnect


def test_public_api_is_complete():
    expected = {"patch", "unpatch", "is_patched", "ResilientSocket", "RetryPolicy", "classify",
                "is_connection_error", "ErrorCategory", "stats", "register", "ErrorInfo"}
    assert expected <= set(resilientsock.__all__)
    for name in resilientsock.__all__:
        assert getattr(resilientsock, name) is not None, name


def test_import_does_not_pull_in_ssl_asyncio_or_wrapt():
    out = run_py(["-c", "import sys, resilientsock; "
                        "print(sorted(m for m in ('ssl', 'asyncio', 'wrapt', 'gevent._socket3') "
                        "if m in sys.modules))"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_demo_runs_and_loses_nothing():
    out = run_py(["-m", "resilientsock", "demo", "--seconds", "5", "--seed", "3"], timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    table = out.stdout.split("reconnects", 1)[1]
    assert "lost" in table
    lost_row = [line for line in out.stdout.splitlines() if line.strip().startswith("lost")][0]
    plain_lost, resilient_lost = lost_row.split()[1:3]
    assert resilient_lost == "0" and int(plain_lost) > 0
    assert "died" in out.stdout


def test_demo_rejects_bad_options():
    out = run_py(["-m", "resilientsock", "demo", "--faults", "earthquake"])
    assert out.returncode == 2 and "earthquake" in out.stderr


def test_examples_run(server):
    examples = ROOT / "examples"
    with FaultProxy(server.address) as proxy:
        host, port = map(str, proxy.address)
        proxy.cut_after(0, "down")
        out = run_py([str(examples / "direct_socket.py"), host, port], timeout=60)
        assert out.returncode == 0, out.stderr
        assert "re-authenticated" in out.stdout and "ACK 3" in out.stdout
        proxy.cut_after(0, "down")
        out = run_py([str(examples / "patched_app.py"), host, port], timeout=60)
        assert out.returncode == 0, out.stderr
        assert "all 20 acknowledged" in out.stdout
