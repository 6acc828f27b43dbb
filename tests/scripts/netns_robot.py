"""The robot loop through the direct API, printing timed events (for the netns tests).

    python netns_robot.py HOST PORT COUNT INTERVAL DEAD_PEER_TIMEOUT|none APP_TIMEOUT

Prints ``EVENT <monotonic> disconnect <CATEGORY> <ERRNO>`` from on_disconnect,
``PROGRESS n`` every 10 acknowledged messages and ``STATS {...}`` at the end. The monotonic
clock is shared by every process on the machine, so the test can time the detection.
"""
import json
import sys
import time

import resilientsock
from resilientsock import ResilientSocket, RetryPolicy

host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
interval = float(sys.argv[4])
dead_peer = None if sys.argv[5] == "none" else float(sys.argv[5])
app_timeout = float(sys.argv[6])


def on_disconnect(sock, info):
    print(f"EVENT {time.monotonic():.3f} disconnect {info.category.name} {info.errno_name}",
          flush=True)


policy = RetryPolicy(deadline=60, dead_peer_timeout=dead_peer, retry_read_timeouts=True,
                     connect_timeout=1, backoff_max=0.5, on_disconnect=on_disconnect)
sock = ResilientSocket.connect((host, port), policy, timeout=app_timeout)
reader = sock.makefile("rb")
for n in range(1, count + 1):
    sock.sendall(b"MSG %d battery=87%%\n" % n)
    answer = reader.readline()
    if answer != b"ACK %d\n" % n:
        raise SystemExit(f"robot: expected ACK {n}, got {answer!r}")
    if n % 10 == 0:
        print(f"PROGRESS {n}", flush=True)
    time.sleep(interval)
sock.close()
print("STATS " + json.dumps(resilientsock.stats()), flush=True)
print(f"robot: all {count} readings acknowledged", flush=True)
