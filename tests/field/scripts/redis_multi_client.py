"""Field client: redis-py MULTI ... EXEC loop, its own retries off (issue #23).

    python redis_multi_client.py HOST PORT PASSWORD DB

Each operation is a transaction (``pipeline(transaction=True)``): INCR key, EXPIRE key; it
must answer [1, True] (a 2 means the transaction ran twice: Garbage). The server counts each
key's executions (its value).
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
    p = r.pipeline(transaction=True)
    p.incr(key)
    p.expire(key, 3600)
    answer = p.execute()
    if answer != [1, True]:
        raise Garbage(f"MULTI INCR {key} EXPIRE EXEC answered {answer}")


run(op)
