"""Row: smtplib vs exim4 (loopback-only daemon with its own config; local delivery into one
mailbox file, counted there; no queue runner). SMTP is server-first: the banner rule (§5a)."""

from __future__ import annotations

from pathlib import Path

import pytest

from . import rows
from .matrix import assert_never_worse, run_row

pytestmark = [pytest.mark.field, pytest.mark.timeout(300)]


def test_smtplib_vs_exim(exim_server, field_dir: Path) -> None:
    assert_never_worse(run_row(rows.smtplib_exim(exim_server, faults=12), field_dir))
