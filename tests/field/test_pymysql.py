"""Rows: PyMySQL vs MariaDB: an INSERT loop through drops, and drops inside the handshake
(issue #14: the auth packet, built from the old greeting's nonce, is re-sent into a new
connection: 1045 Access denied where plain PyMySQL gets 2013). Expected: never 1045."""

from __future__ import annotations

from pathlib import Path

import pytest

from . import rows
from .matrix import assert_never_worse, check, run_row

pytestmark = [pytest.mark.field, pytest.mark.timeout(300)]


def test_pymysql_insert_loop(mariadb_server, field_dir: Path) -> None:
    result = run_row(rows.pymysql_loop(mariadb_server, faults=15), field_dir)
    check(result, "never 1045", result["rs"]["server"]["access_denied_1045"] == 0)
    assert_never_worse(result)


def test_pymysql_drop_in_the_handshake_never_1045(mariadb_server, field_dir: Path) -> None:
    result = run_row(rows.pymysql_handshake(mariadb_server), field_dir)
    rs = result["rs"]
    check(result, "never 1045 (client errors and the server's log)",
          not any("(1045)" in e for e in rs["errors"])
          and rs["server"]["access_denied_1045"] == 0)
    assert_never_worse(result)
