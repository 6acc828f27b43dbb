"""Legacy: write keys with redis-py (its own retries off)."""
import sys
import time

import redis

host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
r = redis.Redis(host=host, port=port, socket_timeout=5, retry_on_timeout=False,
                retry=None, health_check_interval=0)
for i in range(count):
    r.set(f"key:{i}", i)
    time.sleep(0.005)
print(f"redis: {count} ok")
