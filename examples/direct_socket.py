"""ResilientSocket used directly, with an on_reconnect hook that re-authenticates.

    python examples/direct_socket.py HOST PORT

Shows: a client that must log in on every new connection (``AUTH``) before its requests mean
anything. The hook runs on the new connection before unanswered requests are re-sent; its own
I/O is not journaled. Try it against the demo's message server through a FaultProxy.
"""

import sys

from resilientsock import ResilientSocket, RetryPolicy


def reauthenticate(sock: ResilientSocket, attempt: int) -> None:
    sock.sendall(b"AUTH robot-7 secret\n")
    print(f"re-authenticated on reconnect attempt {attempt}")


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    policy = RetryPolicy(deadline=20, on_reconnect=reauthenticate)
    with ResilientSocket.connect((host, port), policy, timeout=5) as sock:
        sock.sendall(b"AUTH robot-7 secret\n")
        reader = sock.makefile("rb")
        for n in (1, 2, 3):
            sock.sendall(b"MSG %d hello\n" % n)
            print(reader.readline().decode().strip())
        print(f"reconnects: {sock.reconnects}")


if __name__ == "__main__":
    main()
