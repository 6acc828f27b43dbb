"""Field client: ftplib in the common legacy loop (issue #23).

    python ftp_client.py HOST PORT USER PASSWORD

One ``FTP`` object is kept. Each operation first checks that the connection lives with NOOP;
if NOOP raises, the application closes the client and logs in again on a new one; then it
runs MKD KEY. A reply the plain client must not get raises ``FTP<code>`` (e.g. ``FTP530``:
"Log in with USER and PASS first", the command went out on a connection that never logged
in). The server counts each key's MKD and its 530 replies.
"""
import ftplib
import sys

from fieldops import Garbage, run

host, port, user, password = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
DEAD = (OSError, EOFError, ftplib.Error)
_codes: dict[str, type[Exception]] = {}


def reply_error(e: ftplib.Error) -> Exception:
    code = str(e)[:3]
    cls = _codes.setdefault(code, type(f"FTP{code}", (Exception,), {"__module__": "__main__"}))
    return cls(str(e))


def login() -> ftplib.FTP:
    ftp = ftplib.FTP()
    ftp.connect(host, port, timeout=5)
    ftp.login(user, password)
    return ftp


state: dict[str, ftplib.FTP | None] = {"ftp": None}


def op(key: str) -> None:
    ftp = state["ftp"]
    alive = False
    if ftp is not None:
        try:
            ftp.voidcmd("NOOP")
            alive = True
        except DEAD:
            ftp.close()
    if not alive:
        state["ftp"] = None
        ftp = state["ftp"] = login()
    try:
        made = ftp.mkd(key)
    except ftplib.error_perm as e:
        raise reply_error(e) from e
    if not made.rstrip("/").endswith(key):
        raise Garbage(f"MKD {key} answered {made!r}")


run(op)
