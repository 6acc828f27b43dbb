"""Field client: redis-py INCR loop, its own retries off (issue #23).

    python redis_incr_client.py HOST PORT PASSWORD DB     (PASSWORD "": none)

Each operation is INCR key on a fresh key: it must answer 1 (a 2 means it ran twice: Garbage).
The server counts each key's executions (its value). redis-py reconnects by itself on the
next command after an error.
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
    value = r.incr(key)
    if value != 1:
        raise Garbage(f"INCR {key} answered {value}: it ran {value} times")


run(op)
