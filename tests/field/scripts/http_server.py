"""Field server: Python's own http.server, HTTP/1.1 keep-alive, default writes.

    python http_server.py PORT DIR REQUEST_LOG

SimpleHTTPRequestHandler as shipped (headers flushed in one write, the body copied in
another), only with protocol_version HTTP/1.1 so a client can keep its connection. Every
request line is appended to REQUEST_LOG (the server's own count).
"""
import functools
import http.server
import sys

port, directory, logpath = int(sys.argv[1]), sys.argv[2], sys.argv[3]
log = open(logpath, "a", buffering=1)


class Handler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        log.write(self.requestline + "\n")


server = http.server.ThreadingHTTPServer(
    ("127.0.0.1", port), functools.partial(Handler, directory=directory))
server.daemon_threads = True
print("listening", flush=True)
server.serve_forever()
