"""Rows of issue #23 ("never worse, judged"): non-idempotent requests whose answers are lost
must not run more often under resilientsock than under the plain client. Each key's
executions are counted on the server (its value after INCR / incr)."""

from __future__ import annotations

from pathlib import Path

import pytest

from . import rows
from .matrix import assert_never_worse, check, run_row
from .servers import MemcachedNoreply

pytestmark = [pytest.mark.field, pytest.mark.timeout(300)]


def test_redis_incr_with_retries_off_never_runs_twice(redis_server, field_dir: Path) -> None:
    result = run_row(rows.redis_incr(redis_server, faults=15), field_dir)
    check(result, "no INCR ran twice under resilientsock", result["rs"]["duplicates"] == 0)
    assert_never_worse(result)


def test_pymemcache_incr_never_runs_twice(memcached_server, field_dir: Path) -> None:
    result = run_row(rows.pymemcache_incr(memcached_server, faults=15), field_dir)
    check(result, "no incr ran twice under resilientsock", result["rs"]["duplicates"] == 0)
    assert_never_worse(result)


@pytest.fixture(scope="module")
def memcached_noreply_server(field_dir: Path):
    pytest.importorskip("pymemcache")
    srv = MemcachedNoreply(field_dir)
    try:
        yield srv.start()
    finally:
        srv.stop()


def test_pymemcache_noreply_set_never_replayed_over_a_newer_value(memcached_noreply_server,
                                                                  field_dir: Path) -> None:
    result = run_row(rows.pymemcache_noreply(memcached_noreply_server, faults=14), field_dir)
    check(result, "no older noreply set replayed over another client's newer value "
          "(every operation told ok ends with the newer value)",
          result["rs"]["lost_silent"] == 0)
    assert_never_worse(result)
