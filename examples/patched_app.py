"""An application that calls resilientsock.patch() at startup; the rest is plain socket code.

    python examples/patched_app.py HOST PORT

patch() must run before the modules that open connections are imported (it monkey-patches
with gevent first). Every client socket created afterwards is resilient.
"""

import resilientsock

resilientsock.patch(deadline=20)

import socket  # noqa: E402
import sys  # noqa: E402


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    sock = socket.create_connection((host, port), timeout=5)
    reader = sock.makefile("rb")
    for n in range(1, 21):
        sock.sendall(b"MSG %d from a patched app\n" % n)
        assert reader.readline() == b"ACK %d\n" % n
    print("all 20 acknowledged;", resilientsock.stats().get("reconnects", 0), "reconnect(s)")


if __name__ == "__main__":
    main()
