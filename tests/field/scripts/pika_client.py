"""Field client: pika BlockingConnection (AMQP 0-9-1), one operation per key.

    python pika_client.py HOST PORT USER PASSWORD publish|confirm|get|consume [tls]

The queues ``$FIELD_PREFIX`` (the destination: what the server counts) and
``$FIELD_PREFIX`` + "src" exist (declared by the orchestrator). publish: ``basic_publish``
of KEY to the destination, no publisher confirms (the call returns once the frames are
written). confirm: the same on a channel in confirm mode (returns when the broker acked).
get: KEY is published (confirmed) to the source queue, then ``basic_get`` takes messages off
it until KEY came; each message taken is moved: published (confirmed) to the destination,
then acked (a message the broker redelivers is moved with "|redelivered" appended: AMQP's
own at-least-once, which plain has too). consume: the same through a ``basic_consume``
consumer, the operation waiting in ``process_data_events`` until the consumer moved KEY
(5 s). The application: a login (``PlainCredentials``) on every new connection; after an
error a closed connection or channel is opened again before the next operation; the
operation is never retried.
"""
import os
import ssl
import sys
import time

import pika
from fieldops import Garbage, run

host, port, user, password, mode = sys.argv[1], int(sys.argv[2]), *sys.argv[3:6]
tls = None
if sys.argv[6:7] == ["tls"]:  # amqps, the broker's self-signed certificate not verified
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    tls = pika.SSLOptions(ctx)
dst = os.environ.get("FIELD_PREFIX", "k")
src = dst + "src"
conn = None
ch = None
moved: set[str] = set()


class NoDelivery(Exception):
    pass


def move(channel, method, _props, body) -> None:
    # a redelivery (the broker's own at-least-once: an ack lost with its connection) is
    # marked, so the server-side count tells it from a message published twice
    channel.basic_publish("", dst, body + b"|redelivered" if method.redelivered else body)
    channel.basic_ack(method.delivery_tag)
    moved.add(body.decode())


def ensure() -> None:
    global conn, ch
    if conn is None or conn.is_closed:
        conn = pika.BlockingConnection(pika.ConnectionParameters(
            host, port, credentials=pika.PlainCredentials(user, password),
            connection_attempts=1, socket_timeout=5, stack_timeout=5,
            blocked_connection_timeout=5, heartbeat=0, ssl_options=tls))
        ch = None
    if ch is None or ch.is_closed:
        ch = conn.channel()
        if mode != "publish":
            ch.confirm_delivery()
        if mode == "consume":
            ch.basic_qos(prefetch_count=10)
            ch.basic_consume(src, move)


def op(key: str) -> None:
    ensure()
    if mode in ("publish", "confirm"):
        ch.basic_publish("", dst, key.encode())
        return
    ch.basic_publish("", src, key.encode())
    end = time.monotonic() + 5
    while key not in moved:
        if time.monotonic() > end:
            raise NoDelivery(f"{key} not moved in 5 s")
        if mode == "get":
            method, props, body = ch.basic_get(src)
            if method is None:
                raise Garbage(f"basic_get: queue empty before {key}")
            move(ch, method, props, body)
        else:
            conn.process_data_events(time_limit=0.5)
    moved.discard(key)


def on_error() -> None:
    global conn, ch
    if conn is not None and not conn.is_closed:
        if ch is not None and ch.is_open:
            return
        ch = None
        return
    conn = ch = None


try:
    run(op, on_error=on_error)
finally:
    if conn is not None and conn.is_open:
        try:
            conn.close()
        except Exception:
            pass
