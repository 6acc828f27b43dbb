"""patch()/unpatch() restore every attribute by identity; patch() twice is harmless;
a later gevent patch_socket() does not undo us; accepted/UDP sockets are plain."""
import socket
import ssl
import sys

import gevent.monkey

gevent.monkey.patch_all()
ABSENT = object()
before = {name: getattr(socket, name, ABSENT) for name in
          ("socket", "SocketType", "create_connection", "fromfd", "socketpair",
           "_fallback_socketpair")}
before_ssl = ssl.SSLContext.sslsocket_class
import resilientsock  # noqa: E402

resilientsock.patch()
resilientsock.patch()
assert resilientsock.is_patched()
assert socket.socket is resilientsock.ResilientSocket
assert ssl.SSLContext.sslsocket_class is resilientsock.ResilientSSLSocket
assert gevent.monkey.get_original("socket", "socket").__module__ == "socket"
gevent.monkey.patch_socket()
assert socket.socket is resilientsock.ResilientSocket, socket.socket
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.connect(("127.0.0.1", 9))
assert not udp.resilient
udp.close()
a, b = socket.socketpair()
assert isinstance(a, socket.socket) and not a.resilient
a.close()
b.close()
resilientsock.unpatch()
assert not resilientsock.is_patched()
for name, value in before.items():
    assert getattr(socket, name, ABSENT) is value, name
assert ssl.SSLContext.sslsocket_class is before_ssl
print("identity ok")
sys.exit(3)
