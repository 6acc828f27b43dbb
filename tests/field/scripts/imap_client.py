"""Field client: imaplib in the common legacy loop (issue #23).

    python imap_client.py HOST PORT USER PASSWORD

One ``IMAP4`` object is kept, logged in with INBOX selected. Each operation first checks that
the connection lives with NOOP; if NOOP raises, the application logs in again on a new
client; then it APPENDs a message whose Subject is KEY. A tagged ``BAD`` raises ``ImapBAD``,
``NO`` raises ``ImapNO`` (a command on a connection that never logged in gets one of them).
The server counts each Subject in the mailbox.
"""
import imaplib
import sys

from fieldops import run

host, port, user, password = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
DEAD = (OSError, EOFError, imaplib.IMAP4.error)


class ImapBAD(Exception):
    pass


class ImapNO(Exception):
    pass


def login() -> imaplib.IMAP4:
    imap = imaplib.IMAP4(host, port, timeout=5)
    imap.login(user, password)
    typ, data = imap.select("INBOX")
    if typ != "OK":
        raise ImapNO(f"SELECT: {typ} {data}")
    return imap


state: dict[str, imaplib.IMAP4 | None] = {"imap": None}


def op(key: str) -> None:
    imap = state["imap"]
    alive = False
    if imap is not None:
        try:
            imap.noop()
            alive = True
        except DEAD:
            try:
                imap.shutdown()
            except Exception:
                pass
    if not alive:
        state["imap"] = None
        imap = state["imap"] = login()
    msg = (f"From: robot@field.test\r\nTo: robot@field.test\r\nSubject: {key}\r\n\r\n"
           f"order {key}\r\n").encode()
    try:
        typ, data = imap.append("INBOX", None, None, msg)
    except imaplib.IMAP4.abort:
        raise
    except imaplib.IMAP4.error as e:
        if "BAD" in str(e):
            raise ImapBAD(str(e)) from e
        raise
    if typ != "OK":
        raise (ImapBAD if typ == "BAD" else ImapNO)(f"APPEND: {typ} {data}")


run(op)
