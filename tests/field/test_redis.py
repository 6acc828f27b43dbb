"""Row: redis-py with db=2 and requirepass vs redis-server (issue #14: ~2,400 of 3,000 keys
went to db 0 under resilientsock). Expected: every key in db 2, none elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from . import rows
from .matrix import assert_never_worse, check, run_row

pytestmark = [pytest.mark.field, pytest.mark.timeout(300)]


def test_redis_db2_never_worse(redis_server, field_dir: Path) -> None:
    result = run_row(rows.redis_db2(redis_server, faults=15), field_dir)
    rs = result["rs"]
    check(result, "every key in db 2, none elsewhere, none lost",
          rs["wrong_place"] == 0 and rs["lost_silent"] == 0)
    assert_never_worse(result)


def test_redis_db2_without_password_never_worse(redis_nopass_server, field_dir: Path) -> None:
    result = run_row(rows.redis_db2_nopass(redis_nopass_server, faults=15), field_dir)
    assert_never_worse(result)


def test_redis_server_down_for_good_gives_up_within_the_apps_timeout(
        redis_server, field_dir: Path) -> None:
    result = run_row(rows.redis_down_for_good(redis_server), field_dir)
    rs = result["rs"]
    check(result, "every call returns within the app's 5 s timeout (+2 s slack)",
          not rs["hang"] and rs["max_op_s"] <= 7.0)
    assert_never_worse(result)
