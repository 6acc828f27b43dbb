"""Field client: PyMySQL INSERT loop (autocommit).

    python pymysql_client.py HOST PORT USER PASSWORD DB loop|connect

loop: one connection; after an error the application reconnects before the next INSERT
(a failed reconnect fails that operation). connect: a new connection for every operation
(connect, INSERT, close), so drops land in the handshake.
"""
import sys

import pymysql
from fieldops import Garbage, run

host, port, user, password, db, mode = sys.argv[1], int(sys.argv[2]), *sys.argv[3:7]
conn = None


def connect() -> pymysql.connections.Connection:
    return pymysql.connect(host=host, port=port, user=user, password=password, database=db,
                           autocommit=True, connect_timeout=5, read_timeout=5,
                           write_timeout=5)


def op(key: str) -> None:
    global conn
    if conn is None:
        conn = connect()
    with conn.cursor() as cur:
        if cur.execute("INSERT INTO t (k) VALUES (%s)", (key,)) != 1:
            raise Garbage("INSERT did not report one row")
    if mode == "connect":
        conn.close()
        conn = None


def on_error() -> None:
    global conn
    if conn is not None:
        try:
            conn.close()
        except Exception:
            pass
    conn = None


run(op, on_error=on_error)
