"""Fixtures of the real-client matrix: each real server started on a free loopback port by
this test run, as its own process, and stopped afterwards (a missing server: the row skips
with a reason). One server per module; every row gives each mode its own keys."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .servers import (
    Exim,
    HTTPServer,
    MariaDB,
    Memcached,
    Nginx,
    Redis,
    Server,
    Sshd,
    WebSockets,
)


def _serve(cls: type[Server], tmp: Path) -> Iterator[Server]:
    srv = cls(tmp)
    try:
        srv.start()  # type: ignore[attr-defined]
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def field_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("field")


@pytest.fixture(scope="module")
def redis_server(field_dir: Path) -> Iterator[Server]:
    pytest.importorskip("redis")
    yield from _serve(Redis, field_dir)


@pytest.fixture(scope="module")
def redis_nopass_server(field_dir: Path) -> Iterator[Server]:
    pytest.importorskip("redis")
    srv = Redis(field_dir, password="")
    try:
        yield srv.start()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def http_server(field_dir: Path) -> Iterator[Server]:
    yield from _serve(HTTPServer, field_dir)


@pytest.fixture(scope="module")
def nginx_server(field_dir: Path) -> Iterator[Server]:
    pytest.importorskip("requests")
    yield from _serve(Nginx, field_dir)


@pytest.fixture(scope="module")
def mariadb_server(field_dir: Path) -> Iterator[Server]:
    pytest.importorskip("pymysql")
    yield from _serve(MariaDB, field_dir)


@pytest.fixture(scope="module")
def memcached_server(field_dir: Path) -> Iterator[Server]:
    pytest.importorskip("pymemcache")
    yield from _serve(Memcached, field_dir)


@pytest.fixture(scope="module")
def exim_server(field_dir: Path) -> Iterator[Server]:
    yield from _serve(Exim, field_dir)


@pytest.fixture(scope="module")
def sshd_server(field_dir: Path) -> Iterator[Server]:
    pytest.importorskip("paramiko")
    yield from _serve(Sshd, field_dir)


@pytest.fixture(scope="module")
def ws_server(field_dir: Path) -> Iterator[Server]:
    pytest.importorskip("websocket")
    yield from _serve(WebSockets, field_dir)
