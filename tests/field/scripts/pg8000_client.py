"""Field client: pg8000 (pure-Python PostgreSQL driver) INSERT loop, password login.

    python pg8000_client.py HOST PORT USER PASSWORD DB tx|auto loop|connect nossl|tls

tx: each operation is one transaction, ``BEGIN; INSERT (key, 1); INSERT (key, 2); COMMIT``
(the server's table records the transaction id of each row: a row written outside its
transaction is counted). auto: one autocommit ``INSERT (key, 0)``. loop: one connection, the
application reconnects (logs in again) before the next operation after a network error;
connect: a new connection (a login) for every operation. nossl: the startup packet in
plaintext; tls: SSLRequest, then TLS (the server's self-signed certificate not verified),
then the login inside it. After an error the application
never retries the operation: a network error (``InterfaceError``) drops the connection, a
database error rolls back what the connection began (as applications do).
"""
import ssl
import sys

import pg8000.native
from fieldops import Garbage, run

host, port, user, password, db, mode, conn_mode = (sys.argv[1], int(sys.argv[2]),
                                                    *sys.argv[3:8])
tls: ssl.SSLContext | bool = False
if sys.argv[8] == "tls":
    tls = ssl.create_default_context()
    tls.check_hostname = False
    tls.verify_mode = ssl.CERT_NONE
conn = None


def connect() -> pg8000.native.Connection:
    return pg8000.native.Connection(user, host=host, port=port, password=password,
                                    database=db, timeout=5, ssl_context=tls)


def op(key: str) -> None:
    global conn
    if conn is None:
        conn = connect()
    if mode == "tx":
        conn.run("BEGIN")
        conn.run("INSERT INTO t (k, part) VALUES (:k, 1)", k=key)
        conn.run("INSERT INTO t (k, part) VALUES (:k, 2)", k=key)
        conn.run("COMMIT")
        if conn.row_count != -1 and conn.row_count not in (0, 1):
            raise Garbage(f"COMMIT row count {conn.row_count}")
    else:
        conn.run("INSERT INTO t (k, part) VALUES (:k, 0)", k=key)
        if conn.row_count != 1:
            raise Garbage(f"INSERT row count {conn.row_count}")
    if conn_mode == "connect":
        conn.close()
        conn = None


def on_error() -> None:
    global conn
    if conn is None:
        return
    if isinstance(sys.exc_info()[1], pg8000.native.DatabaseError):
        try:  # a database error leaves the connection usable: roll back what it began
            conn.run("ROLLBACK")
            return
        except Exception:
            pass
    try:
        conn.close()
    except Exception:
        pass
    conn = None


run(op, on_error=on_error)
