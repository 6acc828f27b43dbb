"""Field client: py-amqp (kombu's transport; blocking sockets), one operation per key.

    python pyamqp_client.py HOST PORT USER PASSWORD publish|confirm|get [tls]

Queues as in pika_client.py: ``$FIELD_PREFIX`` (counted) and ``$FIELD_PREFIX`` + "src".
publish: ``basic_publish`` of KEY, no confirms; confirm: ``Connection(confirm_publish=True)``
(``basic_publish`` waits for the broker's ack); get: KEY published (confirmed) to the source
queue, ``basic_get`` until KEY came, each message moved (published, confirmed, to the
counted queue, then acked; a redelivery marked "|redelivered"). A login on every new
connection; after an error a dead connection is dropped and opened again before the next
operation; the operation is never retried.
"""
import os
import ssl
import sys
import time

import amqp
from fieldops import Garbage, run

host, port, user, password, mode = sys.argv[1], int(sys.argv[2]), *sys.argv[3:6]
tls: dict | bool = False
if sys.argv[6:7] == ["tls"]:  # amqps, the broker's self-signed certificate not verified
    tls = {"cert_reqs": ssl.CERT_NONE, "server_hostname": None}
dst = os.environ.get("FIELD_PREFIX", "k")
src = dst + "src"
conn = None
ch = None


class NoDelivery(Exception):
    pass


def ensure() -> None:
    global conn, ch
    if conn is None:
        c = amqp.Connection(f"{host}:{port}", userid=user, password=password,
                            connect_timeout=5, read_timeout=5, write_timeout=5,
                            heartbeat=0, confirm_publish=mode != "publish", ssl=tls)
        try:
            c.connect()
        except Exception:
            try:
                c.collect()
            except Exception:
                pass
            raise
        conn, ch = c, None
    if ch is None or not ch.is_open:
        ch = conn.channel()


def op(key: str) -> None:
    ensure()
    if mode in ("publish", "confirm"):
        ch.basic_publish(amqp.Message(key), exchange="", routing_key=dst)
        return
    ch.basic_publish(amqp.Message(key), exchange="", routing_key=src)
    end = time.monotonic() + 5
    while True:
        if time.monotonic() > end:
            raise NoDelivery(f"{key} not moved in 5 s")
        msg = ch.basic_get(src, no_ack=False)
        if msg is None:
            raise Garbage(f"basic_get: queue empty before {key}")
        body = msg.body.decode() if isinstance(msg.body, bytes) else msg.body
        out = body + "|redelivered" if msg.delivery_info.get("redelivered") else body
        ch.basic_publish(amqp.Message(out), exchange="", routing_key=dst)
        ch.basic_ack(msg.delivery_tag)
        if body == key:
            return


def on_error() -> None:
    global conn, ch
    if conn is not None and conn.connected and ch is not None and ch.is_open:
        return
    if conn is not None:
        try:
            conn.collect()
        except Exception:
            pass
    conn = ch = None


try:
    run(op, on_error=on_error)
finally:
    if conn is not None:
        try:
            conn.close()
        except Exception:
            pass
