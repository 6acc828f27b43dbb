"""Row of issue #23 for STOMP: stomp.py against RabbitMQ (STOMP plugin), a SEND loop with
receipts; a connection's CONNECT is its login. Under the same faults, resilientsock gives no
ERROR frame the plain client does not get and delivers no SEND more often."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from . import rows
from .matrix import assert_never_worse, check, run_row
from .servers import RabbitMQ, Server

pytestmark = [pytest.mark.field, pytest.mark.timeout(400)]


@pytest.fixture(scope="module")
def rabbitmq_server(field_dir: Path) -> Iterator[Server]:
    srv = RabbitMQ(field_dir)
    try:
        yield srv.start()
    finally:
        srv.stop()


def test_stomp_send_no_error_frames_no_double_send(rabbitmq_server: RabbitMQ,
                                                   field_dir: Path) -> None:
    result = run_row(rows.stomp_send(rabbitmq_server, faults=12), field_dir)
    check(result, "0 ERROR frames under resilientsock (server-side)",
          result["rs"]["server"].get("error_frames", 0) == 0)
    check(result, "no StompERROR under resilientsock", "StompERROR" not in result["rs"]["errors"])
    assert_never_worse(result)
