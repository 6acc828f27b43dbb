"""Rows for pg8000 against PostgreSQL, and pika (BlockingConnection) and py-amqp against
RabbitMQ (AMQP and amqps): both protocols are recognised only by their opening
(docs/design.md §5a, dialects/handshake.py), so every drop after the login must be
surfaced as the plain client sees it. Under the same
seeded faults, plain and under ``python -m resilientsock``, counted on the server: no row
or message written twice where plain wrote it once, no statement outside its transaction,
no failed login or protocol error in the server's log that plain did not cause, no error
type plain did not have, no hang past the application's 5 s.

Opt-in (``FIELD_PG_AMQP=1``), not part of ``make field``: PostgreSQL and RabbitMQ come from
``apt-get install postgresql rabbitmq-server`` (not in ``make field-deps``), pg8000, pika
and amqp (py-amqp) from pip, and the 15 rows take about four minutes (RabbitMQ boots for
~10 s)::

    FIELD_PG_AMQP=1 .venv/bin/python -m pytest -m field -p no:randomly -s \\
        tests/field/test_never_worse_pg_amqp.py

``FIELD_PG_AMQP_SEED=N`` runs another seeded plan, ``FIELD_PG_AMQP_KINDS=answer-lost,...``
mixes more fault kinds in. A server's log and each run's operations are kept under
``$FIELD_RESULTS/runs/ROW/``."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .matrix import Row, assert_never_worse, check, run_row
from .servers_pg_amqp import PostgreSQL, RabbitAMQP

pytestmark = [pytest.mark.field, pytest.mark.timeout(600),
              pytest.mark.skipif(os.environ.get("FIELD_PG_AMQP") != "1",
                                 reason="opt-in: FIELD_PG_AMQP=1 (PostgreSQL, RabbitMQ; ~4 min)")]

PG8000_ERRORS = frozenset({"pg8000.exceptions.InterfaceError",
                           "pg8000.exceptions.DatabaseError", "ConnectionResetError",
                           "ssl.SSLEOFError", "ssl.SSLError", "ssl.SSLZeroReturnError",
                           "BrokenPipeError"})
# a login broken by a cut inside the SCRAM exchange, a re-sent message on another
# connection: what the server logs when a client's bytes reach the wrong place
PG_WORSE = ("auth_rejected", "protocol_errors", "errors")
PIKA_ERRORS = frozenset({
    "pika.exceptions.StreamLostError", "pika.exceptions.AMQPConnectionError",
    "pika.exceptions.ConnectionClosed", "pika.exceptions.ChannelWrongStateError",
    "pika.exceptions.ConnectionWrongStateError", "pika.exceptions.ChannelClosed",
    "pika.exceptions.IncompatibleProtocolError", "pika.exceptions.ProbableAuthenticationError",
    "pika.exceptions.AMQPHeartbeatTimeout"})
# pika over TLS: a drop inside the TLS handshake
PIKA_ERRORS |= {"pika.exceptions.AMQPConnectionError"}
AMQP_WORSE = ("frame_errors", "auth_failed")
# another seed (another order and spacing of the same kinds): FIELD_PG_AMQP_SEED=N
SEED = int(os.environ.get("FIELD_PG_AMQP_SEED", "14"))
# extra fault kinds to mix in, comma-separated (e.g. answer-lost,answer-lost2)
EXTRA = tuple(k for k in os.environ.get("FIELD_PG_AMQP_KINDS", "").split(",") if k)


def pg_row(server: PostgreSQL, mode: str, conn: str, tls: str, **kw: Any) -> Row:
    what = "BEGIN/INSERT/INSERT/COMMIT" if mode == "tx" else "autocommit INSERT"
    how = "a login per operation" if conn == "connect" else "one connection"
    return Row(slug=f"pg8000-{mode}-{conn}-{tls}",
               title=f"pg8000 vs PostgreSQL, {what}, {how}, {tls}", server=server,
               client=["pg8000_client.py", "127.0.0.1", "{port}", server.user, server.password,
                       server.db, mode, conn, tls],
               # mid-statement, mid-answer (an extended-query answer is ~30 bytes), and
               # inside the next login (the SCRAM client-first ~55 bytes in, the server's
               # final/ParameterStatus run ~100 bytes in)
               kinds=("reset", "close", "refuse1.0", "cutup:30", "cutdown:12",
                      "cutup:60:new", "cutdown:100:new", *EXTRA),
               faults=14, seed=SEED, idempotent=False, plain_errors=PG8000_ERRORS,
               worse_if_more=PG_WORSE, **kw)


def pika_row(server: RabbitAMQP, mode: str, tls: bool = False, **kw: Any) -> Row:
    if tls and not server.tls_port:
        pytest.skip("no amqps listener (openssl could not make a certificate)")
    return Row(slug=f"pika-{mode}" + ("-tls" if tls else ""),
               title=f"pika BlockingConnection vs RabbitMQ, {mode}" + (", amqps" if tls else ""),
               server=server, upstream_port=server.tls_port if tls else None,
               client=["pika_client.py", "127.0.0.1", "{port}", server.user, server.password,
                       mode, *(["tls"] if tls else [])],
               kinds=("reset", "close", "refuse1.0", "cutup:30", "cutdown:10",
                      "cutup:20:new", "cutdown:200:new", *EXTRA),
               faults=14, seed=SEED, idempotent=False, plain_errors=PIKA_ERRORS,
               worse_if_more=AMQP_WORSE, **kw)


@pytest.fixture(scope="module")
def pg_server(field_dir: Path) -> Iterator[PostgreSQL]:
    pytest.importorskip("pg8000")
    srv = PostgreSQL(field_dir)
    try:
        yield srv.start()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def amqp_server(field_dir: Path) -> Iterator[RabbitAMQP]:
    pytest.importorskip("pika")
    srv = RabbitAMQP(field_dir)
    try:
        yield srv.start()
    finally:
        srv.stop()


@pytest.mark.parametrize("mode,conn,tls", [("tx", "loop", "nossl"), ("auto", "loop", "nossl"),
                                           ("tx", "connect", "nossl"), ("tx", "loop", "tls"),
                                           ("auto", "connect", "tls")])
def test_pg8000(pg_server: PostgreSQL, field_dir: Path, mode: str, conn: str,
                tls: str) -> None:
    result = run_row(pg_row(pg_server, mode, conn, tls), field_dir)
    check(result, "no row outside its transaction under resilientsock",
          result["rs"]["wrong_place"] == 0)
    assert_never_worse(result)


def lost_in_flight(server: RabbitAMQP, result: dict[str, Any]) -> tuple[int, int]:
    """(lost, lost with no failure among the next 3 operations) for each mode: a publish
    without confirms is at-most-once, so a message handed to the socket just before a drop
    may be lost, plain or not; one lost anywhere else is not the protocol's doing."""
    out = []
    for mode in ("plain", "rs"):
        prefix = f"{mode}-{result['row']}-".replace(".", "")
        held = set((server.dir / f"{prefix}drained.txt").read_text().split())
        ops = [json.loads(ln) for ln in
               (Path(result[mode]["folder"]) / "ops.jsonl").read_text().splitlines() if ln]
        lost = [i for i, o in enumerate(ops) if o["ok"] and o["key"] not in held]
        stray = [i for i in lost if all(o["ok"] for o in ops[i + 1:i + 4])]
        out.append((len(lost), len(stray)))
    return out[0], out[1]


def judge_publish(server: RabbitAMQP, result: dict[str, Any]) -> None:
    """Publishing without confirms: how many messages a drop takes with it depends on how many
    were in flight when it came (measured: 1-3 a run, plain and under resilientsock alike,
    seed 14, six runs each), so silent loss is judged by where it happens, not by count."""
    (plain_lost, plain_stray), (rs_lost, rs_stray) = lost_in_flight(server, result)
    result["worse"] = [w for w in result["worse"] if not w.startswith("lost silently")]
    check(result, f"every message lost was in flight at a drop (rs lost {rs_lost}, "
          f"{rs_stray} elsewhere; plain lost {plain_lost}, {plain_stray} elsewhere)",
          rs_stray <= plain_stray)


@pytest.mark.parametrize("mode,tls", [("publish", False), ("confirm", False), ("get", False),
                                      ("consume", False), ("confirm", True)])
def test_pika(amqp_server: RabbitAMQP, field_dir: Path, mode: str, tls: bool) -> None:
    result = run_row(pika_row(amqp_server, mode, tls), field_dir)
    if mode == "publish":
        judge_publish(amqp_server, result)
    assert_never_worse(result)


def test_pg8000_server_down_for_good(pg_server: PostgreSQL, field_dir: Path) -> None:
    """The server gone for good after a few operations (every connect refused), under the
    default policy: pg8000's connect (not a library that retries by itself) is retried by
    resilientsock, but every call still ends within the application's 5 s."""
    row = pg_row(pg_server, "auto", "loop", "nossl")
    row.slug, row.title = "pg8000-down-for-good", "pg8000 vs PostgreSQL gone for good"
    row.kinds, row.faults, row.after_ops, row.timeout, row.rs_opts = ("down",), 1, 3, 60.0, []
    result = run_row(row, field_dir)
    assert_never_worse(result)


PYAMQP_ERRORS = frozenset({
    "ConnectionResetError", "BrokenPipeError", "ConnectionRefusedError", "TimeoutError",
    "socket.timeout", "OSError", "ConnectionAbortedError",
    "amqp.exceptions.RecoverableConnectionError", "amqp.exceptions.ConnectionForced",
    "amqp.exceptions.AccessRefused",
    "amqp.exceptions.UnexpectedFrame", "amqp.exceptions.FrameSyntaxError",
    "amqp.exceptions.MessageNacked", "IOError", "struct.error", "NoDelivery",
    "ssl.SSLError", "ssl.SSLEOFError", "ssl.SSLZeroReturnError", "ssl.SSLCertVerificationError"})


@pytest.mark.parametrize("mode,tls", [("publish", False), ("confirm", False), ("get", False),
                                      ("confirm", True)])
def test_pyamqp(amqp_server: RabbitAMQP, field_dir: Path, mode: str, tls: bool) -> None:
    """py-amqp (kombu's transport) uses blocking sockets: resilientsock protects them until
    the AMQP handshake is answered, then surfaces every drop."""
    pytest.importorskip("amqp")
    row = pika_row(amqp_server, mode, tls)
    row.slug = f"pyamqp-{mode}" + ("-tls" if tls else "")
    row.title = f"py-amqp vs RabbitMQ, {mode}" + (", amqps" if tls else "")
    row.client = ["pyamqp_client.py", *row.client[1:]]
    row.plain_errors = PYAMQP_ERRORS
    result = run_row(row, field_dir)
    if mode == "publish":
        judge_publish(amqp_server, result)
    assert_never_worse(result)
