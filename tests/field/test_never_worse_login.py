"""Rows of issue #23 for protocols whose connection carries a login: ftplib against
pyftpdlib and imaplib against dovecot, each in the legacy loop that keeps the client object,
checks it with NOOP and logs in again when NOOP raises. Under the same faults, resilientsock
must give no 530 / BAD / NO the plain client does not get, and run no MKD / APPEND more often
(a surfaced drop leaves the socket dead: NOOP raises, as plain)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from . import rows
from .matrix import assert_never_worse, check, run_row
from .servers import Dovecot, PyFTPd, Server, Slapd

pytestmark = [pytest.mark.field, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def ftp_server(field_dir: Path) -> Iterator[Server]:
    srv = PyFTPd(field_dir)
    try:
        yield srv.start()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def dovecot_server(field_dir: Path) -> Iterator[Server]:
    srv = Dovecot(field_dir)
    try:
        yield srv.start()
    finally:
        srv.stop()


def test_ftplib_noop_loop_never_gets_530(ftp_server: PyFTPd, field_dir: Path) -> None:
    result = run_row(rows.ftplib_noop_loop(ftp_server, faults=14), field_dir)
    check(result, "0 x 530 under resilientsock (server-side)",
          result["rs"]["server"].get("reply530", 0) == 0)
    check(result, "no FTP<code> reply error under resilientsock",
          not any(e.startswith("FTP") for e in result["rs"]["errors"]))
    check(result, "no MKD ran twice under resilientsock", result["rs"]["duplicates"] == 0)
    assert_never_worse(result)


def test_imaplib_noop_loop_never_gets_bad(dovecot_server: Dovecot, field_dir: Path) -> None:
    result = run_row(rows.imaplib_noop_loop(dovecot_server, faults=14), field_dir)
    check(result, "0 x BAD / NO under resilientsock",
          not {"ImapBAD", "ImapNO"} & set(result["rs"]["errors"]))
    check(result, "no APPEND ran twice under resilientsock", result["rs"]["duplicates"] == 0)
    assert_never_worse(result)


@pytest.fixture(scope="module")
def slapd_server(field_dir: Path) -> Iterator[Server]:
    pytest.importorskip("ldap3")
    srv = Slapd(field_dir)
    try:
        yield srv.start()
    finally:
        srv.stop()


def test_ldap3_bind_add_no_unbound_write_no_double_add(slapd_server: Slapd,
                                                       field_dir: Path) -> None:
    result = run_row(rows.ldap3_bind_add(slapd_server, faults=14), field_dir)
    check(result, "0 writes on connections that never bound (server-side)",
          result["rs"]["server"].get("writes_unbound", 0) == 0)
    check(result, "0 ADD received twice under resilientsock", result["rs"]["duplicates"] == 0)
    assert_never_worse(result)
