"""Field server: SimpleXMLRPCServer with a counting ``incr`` (issue #23).

    python xmlrpc_server.py PORT LOG

``incr(key)`` adds one to key's counter, appends "INCR key" to LOG before answering (the
server's own count) and returns the new value. HTTP/1.1 keep-alive, a thread per connection.
"""
import sys
import threading
from collections import Counter
from socketserver import ThreadingMixIn
from xmlrpc.server import SimpleXMLRPCRequestHandler, SimpleXMLRPCServer

port, logpath = int(sys.argv[1]), sys.argv[2]
log = open(logpath, "a", buffering=1)
lock = threading.Lock()
counters: Counter[str] = Counter()


class Handler(SimpleXMLRPCRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


class Server(ThreadingMixIn, SimpleXMLRPCServer):
    daemon_threads = True


def incr(key: str) -> int:
    with lock:
        counters[key] += 1
        log.write(f"INCR {key}\n")
        return counters[key]


server = Server(("127.0.0.1", port), Handler, logRequests=False, allow_none=True)
server.register_function(incr)
print("listening", flush=True)
server.serve_forever()
