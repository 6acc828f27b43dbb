"""The fast subset of the real-client matrix (tests/field, docs/design.md §9) that `make test` runs:
redis-py with db=2 and a password against a real redis-server, and a legacy http.client loop
against Python's own http.server; each plain and under resilientsock through the same seeded
fault plan, counted server-side. Fewer faults than `make field`; needs only the `test` extra
(redis-py) and redis-server (`make system-deps`), else it skips with a reason."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from field import rows
from field.matrix import assert_never_worse, check, run_row
from field.servers import HTTPServer, Redis

pytestmark = pytest.mark.timeout(60)

FAST_FAULTS = 8  # 8 faults cover every kind of the plan at least once (5 kinds)


@pytest.fixture
def redis_db2_server(tmp_path: Path) -> Iterator[Redis]:
    pytest.importorskip("redis")
    srv = Redis(tmp_path)
    try:
        yield srv.start()
    finally:
        srv.stop()


@pytest.fixture
def http_server_proc(tmp_path: Path) -> Iterator[HTTPServer]:
    srv = HTTPServer(tmp_path)
    try:
        yield srv.start()
    finally:
        srv.stop()


def test_redis_db2_every_key_in_db2(redis_db2_server: Redis, tmp_path: Path) -> None:
    row = rows.redis_db2(redis_db2_server, faults=FAST_FAULTS, timeout=25)
    row.slug += "-fast"
    result = run_row(row, tmp_path)
    rs = result["rs"]
    check(result, "every key in db 2, none elsewhere, none lost",
          rs["wrong_place"] == 0 and rs["lost_silent"] == 0)
    assert_never_worse(result)


def test_http_client_loop_vs_http_server_finishes(http_server_proc: HTTPServer,
                                                  tmp_path: Path) -> None:
    row = rows.http_server(http_server_proc, faults=FAST_FAULTS, timeout=25)
    row.slug += "-fast"
    result = run_row(row, tmp_path)
    check(result, "the loop finishes (no operation fails)", result["rs"]["failed"] == 0)
    assert_never_worse(result)
