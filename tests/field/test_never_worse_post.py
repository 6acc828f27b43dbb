"""Rows of issue #23 for HTTP and RPC: a POST (no Idempotency-Key) over HTTP and HTTPS with
requests and urllib3, against nginx (a counting backend behind it) and Python's http.server;
xmlrpc.client ``incr``; redis-py MULTI ... EXEC. Whatever the plain client ran once under the
same fault plan, resilientsock runs once: the server counts each key's runs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from . import rows
from .matrix import assert_never_worse, check, run_row
from .servers import NginxPost, PostBackend, Server, XMLRPCServer

pytestmark = [pytest.mark.field, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def nginx_post(field_dir: Path) -> Iterator[Server]:
    pytest.importorskip("requests")
    srv = NginxPost(field_dir)
    try:
        yield srv.start()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def post_backend(field_dir: Path) -> Iterator[Server]:
    pytest.importorskip("requests")
    srv = PostBackend(field_dir / "direct")
    try:
        yield srv.start()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def xmlrpc_server(field_dir: Path) -> Iterator[Server]:
    srv = XMLRPCServer(field_dir)
    try:
        yield srv.start()
    finally:
        srv.stop()


def _judge(result: dict, what: str, named: bool) -> None:
    check(result, f"no {what} ran twice under resilientsock", result["rs"]["duplicates"] == 0)
    check(result, f"the answer-lost faults hit a {what} (the plain client saw errors)",
          result["plain"]["failed"] > 0)
    if named:
        check(result, f"a surfaced {what} carries a note naming it",
              result["rs"]["failed_with_note_naming"] > 0)
    assert_never_worse(result)


@pytest.mark.parametrize(("mode", "tls"), [("requests", False), ("retry0", False),
                                           ("urllib3", False), ("requests", True),
                                           ("retry0", True)])
def test_post_via_nginx_runs_once(nginx_post: NginxPost, field_dir: Path, mode: str,
                                  tls: bool) -> None:
    # Over TLS the RST at the answer's first byte reads as EOF (ragged EOFs suppressed), for
    # the plain client too (RemoteDisconnected): resilientsock passes the EOF on as plain
    # does, so there is no exception to carry the note (it is logged at INFO only).
    _judge(run_row(rows.requests_post(nginx_post, mode, tls, faults=14,
                                      note_names="POST /orders"), field_dir), "POST", not tls)


@pytest.mark.parametrize("mode", ["requests", "retry0"])
def test_post_via_http_server_runs_once(post_backend: PostBackend, field_dir: Path,
                                        mode: str) -> None:
    _judge(run_row(rows.requests_post(post_backend, mode, faults=14,
                                      note_names="POST /orders"), field_dir), "POST", True)


def test_xmlrpc_incr_never_runs_more_than_plain(xmlrpc_server: XMLRPCServer,
                                                field_dir: Path) -> None:
    result = run_row(rows.xmlrpc_incr(xmlrpc_server, faults=14), field_dir)
    check(result, "no incr ran 3 times (xmlrpc.client re-sends once by itself, plain at most "
          "twice)", result["rs"]["max_runs"] <= 2)
    assert_never_worse(result)


def test_redis_multi_exec_with_retries_off_never_runs_twice(redis_server, field_dir: Path
                                                            ) -> None:
    _judge(run_row(rows.redis_multi(redis_server, faults=14, note_names="MULTI ... EXEC"),
                   field_dir), "MULTI/EXEC", True)
