"""The Toxiproxy-compatible HTTP API and the standalone ``proxy`` command: plain HTTP requests
(http.client) in Toxiproxy's JSON shapes, effects measured through the proxies it creates."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import ROOT

from resilientsock.testing import MessageServer, ToxiproxyAPI


@pytest.fixture
def echo() -> Iterator[MessageServer]:
    with MessageServer("echo") as srv:
        yield srv


@pytest.fixture
def api() -> Iterator[ToxiproxyAPI]:
    with ToxiproxyAPI(port=0) as server:
        yield server


def call(address: tuple[str, int], method: str, path: str, body: Any = None,
         raw: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(*address, timeout=10)
    try:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn.request(method, path, body=data, headers=headers or {})
        resp = conn.getresponse()
        text = resp.read()
        return resp.status, json.loads(text) if text else None
    finally:
        conn.close()


def addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def rtt(address: tuple[str, int]) -> float:
    with socket.create_connection(address, timeout=5) as c:
        t0 = time.monotonic()
        c.sendall(b"ping\n")
        assert c.recv(10) == b"ping\n"
        return time.monotonic() - t0


def test_version_and_an_empty_list(api):
    status, body = call(api.address, "GET", "/version")
    assert status == 200 and isinstance(body["version"], str)
    assert call(api.address, "GET", "/proxies") == (200, {})


def test_create_show_list_and_delete_a_proxy(api, echo):
    up = f"127.0.0.1:{echo.address[1]}"
    status, proxy = call(api.address, "POST", "/proxies",
                         {"name": "echo", "listen": "127.0.0.1:0", "upstream": up})
    assert status == 201
    assert set(proxy) == {"name", "listen", "upstream", "enabled", "toxics"}
    assert proxy["name"] == "echo" and proxy["upstream"] == up
    assert proxy["enabled"] is True and proxy["toxics"] == []
    assert addr(proxy["listen"])[1] > 0
    assert rtt(addr(proxy["listen"])) < 0.1
    assert call(api.address, "GET", "/proxies/echo") == (200, proxy)
    assert call(api.address, "GET", "/proxies") == (200, {"echo": proxy})
    assert call(api.address, "POST", "/proxies", {"name": "echo", "upstream": up}) == \
        (409, {"error": "proxy already exists", "status": 409})
    assert call(api.address, "DELETE", "/proxies/echo") == (204, None)
    assert call(api.address, "GET", "/proxies/echo") == \
        (404, {"error": "proxy not found", "status": 404})
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(addr(proxy["listen"]), timeout=5)


def test_proxy_create_errors_are_toxiproxy_shaped(api):
    assert call(api.address, "POST", "/proxies", {"upstream": "127.0.0.1:1"}) == \
        (400, {"error": "missing required field: name", "status": 400})
    assert call(api.address, "POST", "/proxies", {"name": "x"}) == \
        (400, {"error": "missing required field: upstream", "status": 400})
    status, body = call(api.address, "POST", "/proxies", raw=b"{not json")
    assert status == 400 and body["error"].startswith("bad request body")
    assert call(api.address, "GET", "/nowhere")[0] == 404
    assert call(api.address, "DELETE", "/proxies")[0] == 405
    assert call(api.address, "GET", "/proxies", headers={"User-Agent": "Mozilla/5.0"}) == \
        (403, {"error": "User agent not allowed", "status": 403})


def test_toxics_over_http_add_show_update_delete(api, echo):
    up = f"127.0.0.1:{echo.address[1]}"
    _, proxy = call(api.address, "POST", "/proxies", {"name": "p", "upstream": up})
    listen = addr(proxy["listen"])
    status, toxic = call(api.address, "POST", "/proxies/p/toxics",
                         {"type": "latency", "attributes": {"latency": 150}})
    assert status == 200  # Toxiproxy answers 200 here, 201 only for a new proxy
    assert toxic == {"attributes": {"latency": 150, "jitter": 0}, "name": "latency_downstream",
                     "type": "latency", "stream": "downstream", "toxicity": 1.0}
    assert rtt(listen) >= 0.15  # applied (no upper bound: a loaded machine adds its own)
    assert call(api.address, "GET", "/proxies/p/toxics") == (200, [toxic])
    assert call(api.address, "GET", "/proxies/p/toxics/latency_downstream") == (200, toxic)
    assert call(api.address, "GET", "/proxies/p")[1]["toxics"] == [toxic]
    status, changed = call(api.address, "PATCH", "/proxies/p/toxics/latency_downstream",
                           {"attributes": {"latency": 300}})
    assert status == 200 and changed["attributes"] == {"latency": 300, "jitter": 0}
    assert changed["toxicity"] == 1.0
    assert rtt(listen) >= 0.3  # the new latency applies
    status, changed = call(api.address, "POST", "/proxies/p/toxics/latency_downstream",
                           {"toxicity": 0})  # POST still works, as in Toxiproxy
    assert status == 200 and changed["toxicity"] == 0
    assert rtt(listen) < 0.3  # the 300 ms toxic no longer applies (a loaded machine: 0.13 s)
    assert call(api.address, "DELETE", "/proxies/p/toxics/latency_downstream") == (204, None)
    assert call(api.address, "GET", "/proxies/p/toxics") == (200, [])


def test_toxic_errors_are_toxiproxy_shaped(api, echo):
    call(api.address, "POST", "/proxies", {"name": "p", "upstream": f"127.0.0.1:{echo.address[1]}"})
    assert call(api.address, "POST", "/proxies/p/toxics", {"type": "nope"}) == \
        (400, {"error": "invalid toxic type", "status": 400})
    assert call(api.address, "POST", "/proxies/p/toxics",
                {"type": "latency", "stream": "sideways"}) == \
        (400, {"error": "stream was invalid, can be either upstream or downstream",
               "status": 400})
    status, body = call(api.address, "POST", "/proxies/p/toxics",
                        {"type": "latency", "attributes": {"latency": "slow"}})
    assert status == 400 and body["error"].startswith("bad request body")
    assert call(api.address, "POST", "/proxies/p/toxics", {"type": "timeout"})[0] == 200
    assert call(api.address, "POST", "/proxies/p/toxics", {"type": "timeout"}) == \
        (409, {"error": "toxic already exists", "status": 409})
    assert call(api.address, "GET", "/proxies/p/toxics/ghost") == \
        (404, {"error": "toxic not found", "status": 404})
    assert call(api.address, "DELETE", "/proxies/p/toxics/ghost")[0] == 404
    assert call(api.address, "POST", "/proxies/ghost/toxics", {"type": "timeout"}) == \
        (404, {"error": "proxy not found", "status": 404})


def test_disable_over_http_refuses_then_reset_enables(api, echo):
    _, proxy = call(api.address, "POST", "/proxies",
                    {"name": "p", "upstream": f"127.0.0.1:{echo.address[1]}"})
    listen = addr(proxy["listen"])
    call(api.address, "POST", "/proxies/p/toxics",
         {"type": "latency", "stream": "upstream", "attributes": {"latency": 200}})
    status, body = call(api.address, "PATCH", "/proxies/p", {"enabled": False})
    assert status == 200 and body["enabled"] is False and body["listen"] == proxy["listen"]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(listen, timeout=5)
    assert call(api.address, "POST", "/reset") == (204, None)
    status, body = call(api.address, "GET", "/proxies/p")
    assert body["enabled"] is True and body["toxics"] == []
    assert rtt(listen) < 0.3  # the 300 ms toxic no longer applies (a loaded machine: 0.13 s)


def test_a_proxy_created_disabled_and_upstream_changed(api, echo):
    with MessageServer("echo") as other:
        status, proxy = call(api.address, "POST", "/proxies",
                             {"name": "p", "listen": "127.0.0.1:0", "enabled": False,
                              "upstream": f"127.0.0.1:{other.address[1]}"})
        assert status == 201 and proxy["enabled"] is False
        status, proxy = call(api.address, "PATCH", "/proxies/p",
                             {"enabled": True, "upstream": f"127.0.0.1:{echo.address[1]}"})
        assert status == 200 and proxy["enabled"] is True
        rtt(addr(proxy["listen"]))
        assert echo.bytes_received == 5 and other.bytes_received == 0


def test_populate_creates_keeps_and_replaces(api, echo):
    up = f"127.0.0.1:{echo.address[1]}"
    status, body = call(api.address, "POST", "/populate",
                        [{"name": "a", "upstream": up}, {"name": "b", "upstream": up}])
    assert status == 201 and [p["name"] for p in body["proxies"]] == ["a", "b"]
    first = {p["name"]: p["listen"] for p in body["proxies"]}
    status, body = call(api.address, "POST", "/populate",
                        [{"name": "a", "upstream": up, "listen": first["a"]}])
    assert status == 201 and body["proxies"][0]["listen"] == first["a"]  # unchanged: kept
    assert call(api.address, "POST", "/populate", [{"name": "c"}]) == \
        (400, {"error": "missing required field: upstream at proxy 1", "status": 400})
    assert sorted(call(api.address, "GET", "/proxies")[1]) == ["a", "b"]


# -- the standalone command -------------------------------------------------------------------

def run_cmd(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "resilientsock.testing", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_the_proxy_command_serves_proxies_and_the_api(echo):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    up = f"127.0.0.1:{echo.address[1]}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "resilientsock.testing", "proxy", "--listen", "127.0.0.1:0",
         "--upstream", up, "--name", "echo", "--listen", "127.0.0.1:0", "--upstream", up,
         "--api", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env)
    try:
        lines = []
        assert proc.stdout is not None
        for _ in range(5):  # two proxies, the api, "ready": bounded by the line count
            lines.append(proc.stdout.readline().strip())
            if lines[-1] == "ready":
                break
        assert lines[-1] == "ready", lines
        proxies = {w[1]: addr(w[2]) for w in (ln.split() for ln in lines) if w[0] == "proxy"}
        assert sorted(proxies) == ["echo", "proxy2"]
        api = addr(next(ln.split()[1] for ln in lines if ln.startswith("api ")))
        status, toxic = call(api, "POST", "/proxies/echo/toxics",
                             {"type": "latency", "attributes": {"latency": 150}})
        assert status == 200
        assert 0.15 <= rtt(proxies["echo"]) < 0.4
        assert rtt(proxies["proxy2"]) < 0.1
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err


@pytest.mark.parametrize("args", [
    ["proxy"],
    ["proxy", "--listen", "nowhere"],
    ["proxy", "--listen", "127.0.0.1:0"],
    ["proxy", "--frobnicate"],
    ["bogus"],
])
def test_bad_options_are_one_line_and_status_2(args):
    out = run_cmd(*args)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "error" in out.stderr and out.stdout == ""


def test_help_explains_the_proxy_command():
    out = run_cmd("proxy", "--help")
    assert out.returncode == 0
    for word in ("--listen", "--upstream", "--api", "Toxiproxy", "/proxies"):
        assert word in out.stdout


@pytest.mark.parametrize("args", [[], ["servers"]])
def test_the_stdin_servers_mode_still_works(args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "resilientsock.testing", *args],
                         input="listen 127.0.0.1 0\ncount\nquit\n", capture_output=True,
                         text=True, timeout=30, env=env)
    lines = out.stdout.splitlines()
    assert out.returncode == 0, out.stderr
    assert lines[0].startswith("listening 127.0.0.1 ") and lines[1:] == ["count 0", "bye"]


def test_several_requests_on_one_keep_alive_connection(api):
    conn = http.client.HTTPConnection(*api.address, timeout=10)
    try:
        for _ in range(3):
            conn.request("GET", "/version")
            resp = conn.getresponse()
            assert resp.status == 200 and json.loads(resp.read())["version"]
    finally:
        conn.close()


def test_moving_a_proxy_to_another_listen_address(api, echo):
    _, proxy = call(api.address, "POST", "/proxies",
                    {"name": "p", "upstream": f"127.0.0.1:{echo.address[1]}"})
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    new_port = free.getsockname()[1]
    free.close()
    status, moved = call(api.address, "PATCH", "/proxies/p", {"listen": f"127.0.0.1:{new_port}"})
    assert status == 200 and moved["listen"] == f"127.0.0.1:{new_port}"
    assert rtt(("127.0.0.1", new_port)) < 0.1
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(addr(proxy["listen"]), timeout=5)


# -- wave 3: Toxiproxy's behaviour where clients notice it -------------------------------------

def _data_segments_in(sock: socket.socket) -> int:
    """tcpi_data_segs_in of struct tcp_info (Linux >= 4.6): segments with data received."""
    import struct

    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    if len(info) < 156:
        pytest.skip("this kernel's tcp_info has no tcpi_data_segs_in")
    return int(struct.unpack_from("I", info, 152)[0])


def _read_response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "closed"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed"
        body += chunk
    return head + b"\r\n\r\n" + body


def test_each_response_is_one_write_on_a_keep_alive_connection(api):
    """Headers and body in one write: two writes on a keep-alive connection meet Nagle's
    algorithm and a delayed ACK (~40 ms a request, measured with requests.Session)."""
    with socket.create_connection(api.address, timeout=10) as c:
        for _ in range(3):
            before = _data_segments_in(c)
            c.sendall(b"GET /version HTTP/1.1\r\nHost: toxiproxy\r\n\r\n")
            assert b'"version"' in _read_response(c)
            assert _data_segments_in(c) - before == 1  # one segment: one write


@pytest.mark.parametrize(("method", "path", "status"), [
    ("PUT", "/proxies", 405), ("OPTIONS", "/version", 405), ("HEAD", "/proxies", 405),
    ("PUT", "/reset", 405), ("PUT", "/nothing/here", 404), ("OPTIONS", "/", 404),
])
def test_other_methods_get_405_on_a_known_path_and_404_elsewhere(api, method, path, status):
    conn = http.client.HTTPConnection(*api.address, timeout=10)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        resp.read()
        assert resp.status == status
        conn.request("GET", "/version")  # the connection is still usable
        assert conn.getresponse().status == 200
    finally:
        conn.close()


def test_a_listen_host_name_comes_back_resolved(api, echo):
    status, proxy = call(api.address, "POST", "/proxies",
                         {"name": "p", "listen": "localhost:0",
                          "upstream": f"127.0.0.1:{echo.address[1]}"})
    assert status == 201 and proxy["listen"].startswith("127.0.0.1:"), proxy
    assert rtt(addr(proxy["listen"])) < 1.0


def test_populate_without_listen_replaces_an_existing_proxy(api, echo):
    up = f"127.0.0.1:{echo.address[1]}"
    _, body = call(api.address, "POST", "/populate", [{"name": "a", "upstream": up}])
    old = body["proxies"][0]["listen"]
    call(api.address, "POST", "/proxies/a/toxics", {"type": "latency",
                                                    "attributes": {"latency": 100}})
    status, body = call(api.address, "POST", "/populate", [{"name": "a", "upstream": up}])
    assert status == 201
    new = body["proxies"][0]
    assert new["listen"] != old and new["toxics"] == []  # a new proxy, as Toxiproxy makes
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(addr(old), timeout=5)


def test_runtime_errors_name_the_address_or_file_and_exit_2(echo, tmp_path):
    up = f"127.0.0.1:{echo.address[1]}"
    taken = f"127.0.0.1:{echo.address[1]}"  # the echo server listens there already
    out = run_cmd("proxy", "--listen", taken, "--upstream", up)
    assert out.returncode == 2, out.stderr
    assert taken in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    missing = tmp_path / "no-such-config.json"
    out = run_cmd("proxy", "--config", str(missing))
    assert out.returncode == 2, out.stderr
    assert str(missing) in out.stderr and len(out.stderr.strip().splitlines()) == 1
    out = run_cmd("proxy", "--api", taken)
    assert out.returncode == 2 and taken in out.stderr, out.stderr


def test_every_service_has_close_and_is_a_context_manager(echo):
    from resilientsock import Relay
    from resilientsock.testing import FaultProxy

    services = [MessageServer().start(), FaultProxy(echo.address).start(),
                ToxiproxyAPI(port=0).start(), Relay(("127.0.0.1", 0), echo.address).start()]
    for service in services:
        address = service.address
        service.close()
        service.close()  # twice is harmless
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(address, timeout=5)
    with MessageServer() as a, FaultProxy(echo.address) as b, ToxiproxyAPI(port=0) as c, \
            Relay(("127.0.0.1", 0), echo.address) as d:
        assert all(s.address[1] for s in (a, b, c, d))
