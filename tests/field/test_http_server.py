"""Row: a legacy http.client loop vs Python's own http.server, which writes the headers and
the body in separate writes (issue #14: the loop dies at the first drop mid-answer).
Expected: under resilientsock the loop finishes, through resets and cuts."""

from __future__ import annotations

from pathlib import Path

import pytest

from . import rows
from .matrix import assert_never_worse, check, run_row

pytestmark = [pytest.mark.field, pytest.mark.timeout(300)]


def test_http_client_vs_http_server(http_server, field_dir: Path) -> None:
    result = run_row(rows.http_server(http_server, faults=15), field_dir)
    check(result, "the loop finishes (no operation fails)", result["rs"]["failed"] == 0)
    assert_never_worse(result)
