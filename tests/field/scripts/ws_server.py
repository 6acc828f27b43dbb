"""Field server: a websockets (asyncio) echo server that logs every message it receives.

    python ws_server.py PORT MESSAGE_LOG
"""
import asyncio
import logging
import sys

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

port, logpath = int(sys.argv[1]), sys.argv[2]
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
log = open(logpath, "a", buffering=1)


class Counted(ServerConnection):
    """Logs one "!handshake ..." line for every connection whose opening handshake failed,
    classified by the first bytes it got: "empty" (closed before sending anything), "cut"
    (the start of an HTTP request, cut short) or "garbage" (bytes that are no HTTP request:
    the server's count of garbage it was sent)."""

    first = b""

    def data_received(self, data: bytes) -> None:
        if len(self.first) < 64:
            self.first += data[:64 - len(self.first)]
        super().data_received(data)

    async def handshake(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        try:
            await super().handshake(*args, **kwargs)
        finally:
            if self.protocol.state is not State.OPEN:
                kind = "empty" if not self.first else "cut" if \
                    b"GET /".startswith(self.first[:5]) else "garbage"
                log.write(f"!handshake-{kind} {self.first[:24]!r} "
                          f"{self.protocol.handshake_exc!r}\n")


async def echo(ws) -> None:  # type: ignore[no-untyped-def]
    try:
        async for message in ws:
            log.write(f"{message}\n")
            await ws.send(f"echo:{message}")
    except ConnectionClosed:
        pass


async def main() -> None:
    async with serve(echo, "127.0.0.1", port, ping_interval=None,
                     create_connection=Counted) as server:
        print("listening", flush=True)
        await server.serve_forever()


asyncio.run(main())
