"""Field client: websocket-client send/recv loop on one WebSocket.

    python ws_client.py URL

Each operation sends KEY and must receive "echo:KEY" (else Garbage). After an error the
application opens a new WebSocket at the next operation.
"""
import sys

import websocket
from fieldops import Garbage, run

url = sys.argv[1]
ws: websocket.WebSocket | None = None


def op(key: str) -> None:
    global ws
    if ws is None:
        ws = websocket.create_connection(url, timeout=5)
    ws.send(key)
    answer = ws.recv()
    if answer != f"echo:{key}":
        raise Garbage(repr(answer)[:80])


def on_error() -> None:
    global ws
    if ws is not None:
        ws.close(timeout=1)
    ws = None


run(op, on_error=on_error)
