"""Field client: redis-py SET loop with db=N and a password, its own retries off.

    python redis_client.py HOST PORT PASSWORD DB     (PASSWORD "": none)

Each operation is SET key -> key; every 10th also GETs it back (a wrong value is Garbage).
redis-py reconnects by itself on the next command after an error (the application does
nothing): each new connection sends AUTH and SELECT DB first (Connection.on_connect).
"""
import sys

import redis
from fieldops import Garbage, run
from redis.backoff import NoBackoff
from redis.retry import Retry

host, port, password, db = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
r = redis.Redis(host=host, port=port, db=db, password=password or None, socket_timeout=5,
                socket_connect_timeout=5, retry=Retry(NoBackoff(), 0),
                health_check_interval=0)


def op(key: str) -> None:
    if r.set(key, key) is not True:
        raise Garbage("SET did not answer OK")
    if key.endswith("0") and r.get(key) != key.encode():
        raise Garbage(f"GET {key} returned something else")


run(op)
