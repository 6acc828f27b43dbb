"""socket._fallback_socketpair under patch(): CPython 3.13's test_socket regression.

The pure-Python socketpair (a loopback TCP connection, authenticated by comparing addresses)
must build ``socket.socket`` instances, so that what a caller changes on ``socket.socket`` is
seen by it: CPython's test patches ``getsockname`` there to connect a rogue peer first and
expects the pair to be refused with an OSError. Before the fix gevent's copy of the function
built gevent sockets, the rogue peer was never injected and the pair was accepted.
"""
import socket
import sys

import resilientsock

family = socket.AF_INET6 if "--ipv6" in sys.argv else socket.AF_INET
present = hasattr(socket, "_fallback_socketpair")  # 3.13 (and later 3.12.x security releases)
resilientsock.patch()
if not present:  # nothing to replace, and patch() must not add the name
    assert not hasattr(socket, "_fallback_socketpair")
    resilientsock.unpatch()
    assert not hasattr(socket, "_fallback_socketpair")
    print("absent on this Python; fallback ok")
    sys.exit(0)

# 1. A normal pair: our class, pass-through, and it carries data both ways.
a, b = socket._fallback_socketpair(family)
assert isinstance(a, socket.socket) and isinstance(b, socket.socket), (type(a), type(b))
assert not a.resilient and not b.resilient
a.sendall(b"ping")
assert b.recv(4) == b"ping"
b.sendall(b"pong")
assert a.recv(4) == b"pong"
a.close()
b.close()

# 2. The injected rogue peer (CPython test_socket.test_injected_authentication_failure).
orig_getsockname = socket.socket.getsockname
injected = []


def inject_getsockname(self):
    sockname = orig_getsockname(self)
    if not injected:
        rogue = socket.socket(family, socket.SOCK_STREAM)
        rogue.setblocking(False)
        try:
            rogue.connect(sockname[:2])
        except (BlockingIOError, InterruptedError):
            pass
        rogue.setblocking(True)
        injected.append(rogue)
    return sockname


socket.socket.getsockname = inject_getsockname
try:
    pair = socket._fallback_socketpair(family)
except OSError as exc:
    print(f"refused: {type(exc).__name__}")
else:
    print(f"accepted a pair with a rogue peer: {pair}")
    sys.exit(1)
finally:
    socket.socket.getsockname = orig_getsockname
    for rogue in injected:
        rogue.close()
assert len(injected) == 1, injected

# 3. unpatch() puts gevent's function back.
resilientsock.unpatch()
import gevent._socket3  # noqa: E402

assert socket._fallback_socketpair is gevent._socket3._fallback_socketpair
print("fallback ok")
