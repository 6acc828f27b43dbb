"""A legacy robot client, exactly as it would be written without resilientsock.

    python robot_client.py HOST PORT COUNT [INTERVAL [TIMEOUT]]

Sends COUNT important numbered readings ("MSG n ...") and waits for "ACK n" after each.
Plain stdlib; it knows nothing about resilientsock. The demo runs it twice: plainly, and
unchanged under ``python -m resilientsock``.
"""

import socket
import sys
import time

host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
interval = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
timeout = float(sys.argv[5]) if len(sys.argv) > 5 else 5.0

sock = socket.create_connection((host, port), timeout=timeout)
reader = sock.makefile("rb")
for n in range(1, count + 1):
    sock.sendall(b"MSG %d battery=87%% position=(12.5,7.25) status=cleaning\n" % n)
    answer = reader.readline()
    if answer != b"ACK %d\n" % n:
        raise SystemExit(f"robot: expected ACK {n}, got {answer!r}")
    if interval:
        time.sleep(interval)
sock.close()
print(f"robot: all {count} readings acknowledged")
