"""Protocol knowledge for the recovery core, as sans-IO modules (DESIGN §5a, §5b).

``detect(first_write, first_read, prelude=N)`` picks a dialect from a connection lineage's
first bytes; the core then feeds it every record written and chunk read and asks it whether a
drop may be recovered (``refusal``), what setup a new connection needs (``restore``), whether
an exchange must be kept whole (``hold``), whether the answer in progress may be re-requested
(``resumable``) and which bytes of an answer are exempt from comparison (``mask``).

Rules of this module: it imports nothing heavy at import time (h11 is imported by the HTTP
dialect when one is made); ``detect`` is cheap and never raises; None means an unknown protocol
and the core's byte rules (including the banner rule for SMTP, FTP, POP3, IMAP).
"""

from __future__ import annotations

from ._base import Dialect as Dialect
from ._base import Restore as Restore
from ._base import SetupMismatch as SetupMismatch

__all__ = ["Dialect", "Restore", "SetupMismatch", "detect"]


def detect(first_write: bytes | None, first_read: bytes | None, *,
           prelude: int = 0) -> Dialect | None:
    """The dialect for a connection whose first bytes are these, or None (unknown protocol).

    ``first_write``: the first record, when the application wrote before reading;
    ``first_read``: the first chunk, when the server spoke first. ``prelude`` > 0 with no
    specific dialect gives a ``PreludeDialect(prelude)``. Never raises.
    """
    return None
