"""Field server: a websockets (asyncio) echo server that logs every message it receives.

    python ws_server.py PORT MESSAGE_LOG
"""
import asyncio
import logging
import sys

from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

port, logpath = int(sys.argv[1]), sys.argv[2]
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
log = open(logpath, "a", buffering=1)


async def echo(ws) -> None:  # type: ignore[no-untyped-def]
    try:
        async for message in ws:
            log.write(f"{message}\n")
            await ws.send(f"echo:{message}")
    except ConnectionClosed:
        pass


async def main() -> None:
    async with serve(echo, "127.0.0.1", port, ping_interval=None) as server:
        print("listening", flush=True)
        await server.serve_forever()


asyncio.run(main())
