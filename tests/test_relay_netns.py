"""Session mode across a real address change (root + iproute2): the client's namespace loses
its address and gets a new one mid-stream, and the network forgets the old one; the session
resumes from the new address, every reading exactly once, one upstream connection (§11)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT

from resilientsock.testing import NetnsPair
from resilientsock.testing._netns import _ip

WHY_NOT = NetnsPair.unavailable()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(WHY_NOT is not None, reason=str(WHY_NOT))]

ROBOT = ROOT / "resilientsock" / "_scripts" / "robot_client.py"
SERVER = Path(__file__).parent / "scripts" / "session_relay_server.py"
PORT = 7100
NEW_IP = "10.77.1.3"
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def test_a_session_survives_the_client_changing_address() -> None:
    with NetnsPair() as net:
        server = net.popen("server", [sys.executable, str(SERVER), net.server_ip, str(PORT)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=ENV)
        assert server.stdout is not None and server.stdin is not None
        client: Any = None
        try:
            assert server.stdout.readline().strip() == "ready"
            count = 400
            client = net.popen("client", [
                sys.executable, "-m", "resilientsock", "--session", f"{net.server_ip}:{PORT}",
                "--log-level", "INFO", "--deadline", "30", "--dead-peer-timeout", "1",
                str(ROBOT), net.server_ip, str(PORT), str(count), "0.01", "10"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)

            def report() -> dict[str, Any]:
                server.stdin.write("report\n")  # type: ignore[union-attr]
                server.stdin.flush()  # type: ignore[union-attr]
                return json.loads(server.stdout.readline())  # type: ignore[union-attr]

            end = time.monotonic() + 30
            while len(report()["received"]) < 50:
                assert client.poll() is None, client.stderr.read()
                assert time.monotonic() < end, "fewer than 50 readings in 30 s"
                time.sleep(0.02)  # polling interval of a bounded wait, not synchronisation
            # The move: the old address goes, a new one comes (DHCP renewal, roaming), and
            # the network no longer delivers to the old one (Linux would keep a socket on a
            # removed address alive between these two namespaces).
            dev = net.client_dev
            _ip("-n", net.client_ns, "addr", "del", f"{net.client_ip}/24", "dev", dev)
            _ip("-n", net.client_ns, "addr", "add", f"{NEW_IP}/24", "dev", dev)
            _ip("-n", net.server_ns, "route", "add", "blackhole", f"{net.client_ip}/32")
            out, err = client.communicate(timeout=90)
            assert client.returncode == 0, err[-3000:]
            assert f"all {count} readings acknowledged" in out
            assert "resumed" in err, err[-2000:]
            final = report()
            assert final["received"] == list(range(1, count + 1))
            assert final["connections"] == 1
            assert final["resumed"] >= 1, err[-2000:]
        finally:
            if client is not None and client.poll() is None:
                client.kill()
                client.communicate(timeout=10)
            server.stdin.close()
            server.wait(timeout=20)
            server.stdout.close()
