"""An app that calls resilientsock.patch() at startup, then uses plain socket code."""
import socket
import sys

import resilientsock

resilientsock.patch(deadline=10, backoff_max=0.2)
host, port = sys.argv[1], int(sys.argv[2])
s = socket.create_connection((host, port), timeout=5)
assert isinstance(s, socket.socket) and type(s).__name__ == "ResilientSocket"
f = s.makefile("rb")
for n in range(1, 51):
    s.sendall(b"MSG %d x\n" % n)
    assert f.readline() == b"ACK %d\n" % n
print("patched app: 50 ok, reconnects", resilientsock.stats().get("reconnects", 0))
