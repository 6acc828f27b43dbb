"""Row: websocket-client vs a websockets server (issue #14: frames re-sent into a
connection that never did the HTTP Upgrade; the app froze 33 s). Expected: the drop is
surfaced at once, with a note; never garbage, never a freeze."""

from __future__ import annotations

from pathlib import Path

import pytest

from . import rows
from .matrix import assert_never_worse, check, run_row

pytestmark = [pytest.mark.field, pytest.mark.timeout(300)]

AT_ONCE_S = 3.0  # "at once": well under the app's 5 s timeout (picked: 2 cores, shared)


def test_websocket_client_vs_websockets(ws_server, field_dir: Path) -> None:
    result = run_row(rows.websocket_client(ws_server, faults=15), field_dir)
    rs = result["rs"]
    # the server classifies each failed opening handshake by its first bytes: a request cut
    # short (the faults do that in both modes), nothing at all, or garbage (frames)
    check(result, "never garbage (the client's checks, and no frame bytes reach a server "
          "that expects an HTTP Upgrade)",
          "Garbage" not in rs["errors"] and rs["server"]["garbage_handshakes"] == 0)
    slow = {e: dt for e, dt in rs["max_failed_op_s_by_type"].items()
            if e not in rows.CONNECT_ERRORS and dt > AT_ONCE_S}
    check(result, f"a drop is surfaced at once (every failure but a refused connect within "
          f"{AT_ONCE_S} s)", not slow)
    check(result, "with a note from resilientsock",
          rs["failed"] == 0 or rs["failed_with_rs_note"] > 0)
    assert_never_worse(result)
