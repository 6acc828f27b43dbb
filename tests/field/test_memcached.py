"""Row: pymemcache vs memcached (set + get loop)."""

from __future__ import annotations

from pathlib import Path

import pytest

from . import rows
from .matrix import assert_never_worse, run_row

pytestmark = [pytest.mark.field, pytest.mark.timeout(300)]


def test_pymemcache_vs_memcached(memcached_server, field_dir: Path) -> None:
    assert_never_worse(run_row(rows.pymemcache(memcached_server, faults=15), field_dir))
