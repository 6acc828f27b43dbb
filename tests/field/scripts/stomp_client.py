"""Field client: stomp.py SEND loop on one Connection (issue #23).

    python stomp_client.py HOST PORT USER PASSWORD

One ``stomp.Connection`` (STOMP 1.2, no heartbeats). Each operation sends KEY to the queue
``/queue/$FIELD_PREFIX`` with a ``receipt`` header and waits (5 s) for its RECEIPT: the
broker has the message. Before each operation, as applications do, it reconnects
(``connect(..., wait=True)``) when ``is_connected()`` is false. An ERROR frame from the
broker during an operation raises ``StompERROR`` (e.g. "You must log in using CONNECT
first": a frame sent on a connection that never sent CONNECT); no RECEIPT in 5 s raises
``NoReceipt``. The broker's queue is drained and counted afterwards.
"""
import os
import sys
import threading

import stomp
from fieldops import run

host, port, user, password = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
queue = "/queue/" + os.environ.get("FIELD_PREFIX", "k")


class StompERROR(Exception):
    pass


class NoReceipt(Exception):
    pass


class Listener(stomp.ConnectionListener):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.receipts: dict[str, threading.Event] = {}
        self.errors: list[str] = []

    def on_receipt(self, frame: stomp.utils.Frame) -> None:
        with self.lock:
            ev = self.receipts.get(frame.headers.get("receipt-id", ""))
        if ev is not None:
            ev.set()

    def on_error(self, frame: stomp.utils.Frame) -> None:
        with self.lock:
            self.errors.append(frame.headers.get("message", "?"))
            events = list(self.receipts.values())
        for ev in events:  # an ERROR ends the wait of whoever is waiting
            ev.set()


listener = Listener()
conn = stomp.Connection([(host, port)], heartbeats=(0, 0), reconnect_attempts_max=1,
                        timeout=5)
conn.set_listener("field", listener)


def op(key: str) -> None:
    if not conn.is_connected():
        conn.connect(user, password, wait=True, headers={"host": "/"})
    ev = threading.Event()
    with listener.lock:
        listener.receipts[key] = ev
        errors_before = len(listener.errors)
    try:
        conn.send(queue, key, headers={"receipt": key})
        got = ev.wait(5)
    finally:
        with listener.lock:
            listener.receipts.pop(key, None)
            errors = listener.errors[errors_before:]
    if errors:
        raise StompERROR("; ".join(errors)[:200])
    if not got:
        raise NoReceipt(f"no RECEIPT for {key} in 5 s")


def on_error() -> None:
    if conn.is_connected():  # what the broker may still hold for this connection is its own
        return
    try:
        conn.disconnect()
    except Exception:
        pass


try:
    run(op, on_error)
finally:
    try:
        conn.disconnect()
    except Exception:
        pass
