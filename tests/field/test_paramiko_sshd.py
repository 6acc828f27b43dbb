"""Row: paramiko vs OpenSSH (sshd -D -f own config, generated keys; each exec_command
appends its key to a file: sshd's side of the count). Issue #14: encrypted packets re-sent
into a new TCP connection (SSHException('Invalid packet blocking')). Expected: the drop is
surfaced at once, with a note; never garbage, never a freeze."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from . import rows
from .matrix import assert_never_worse, check, run_row

pytestmark = [pytest.mark.field, pytest.mark.timeout(300)]

# what paramiko says when it is handed bytes of another connection (issue #14)
GARBLED = re.compile(r"Invalid packet blocking|Mismatched MAC|[Bb]ad packet|[Dd]ecrypt|"
                     r"Indecipherable|Expected packet")
AT_ONCE_S = 3.0  # "at once": well under the app's 5 s timeout (picked: 2 cores, shared)


def test_paramiko_vs_openssh(sshd_server, field_dir: Path) -> None:
    result = run_row(rows.paramiko_sshd(sshd_server, faults=10), field_dir)
    rs = result["rs"]
    decrypted_garbage = [m for m in rs["error_messages"] if GARBLED.search(m)]
    check(result, "paramiko never decrypts garbage (no packet-blocking / MAC errors)",
          not decrypted_garbage)
    # a cut inside the client's own opening handshake is garbage to the server in both modes
    check(result, "never garbage (the client's checks; the server saw no more than plain)",
          "Garbage" not in rs["errors"]
          and rs["server"]["sshd_saw_garbage"] <= result["plain"]["server"]["sshd_saw_garbage"])
    slow = {e: dt for e, dt in rs["max_failed_op_s_by_type"].items()
            if e not in rows.CONNECT_ERRORS and dt > AT_ONCE_S}
    check(result, f"a drop is surfaced at once (every failure but a refused connect within "
          f"{AT_ONCE_S} s)", not slow)
    # paramiko raises its own exceptions from its transport thread's state (EmptyOutput,
    # "SSH session not active"): a note on the socket error may never reach the app, so a
    # resilientsock log line naming SSH counts as the note too
    logged = [ln for ln in rs["rs_log_lines"] if "SSH" in ln]
    check(result, "with a note from resilientsock (on the error, or logged naming SSH)",
          rs["failed"] == 0 or rs["failed_with_rs_note"] > 0 or bool(logged))
    assert_never_worse(result)
