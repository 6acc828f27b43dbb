"""Field server: a counting HTTP backend for non-idempotent requests (issue #23).

    python post_server.py PORT LOG

POST /orders?id=KEY (any body): the order KEY is placed once more; the line "POST KEY" is
appended to LOG *before* the answer is written (the server's own count), and the answer is
``{"id": KEY, "n": N}``, N the times KEY was placed. HTTP/1.1 keep-alive, Content-Length.
Anything else: 404, logged as "OTHER <request line>".
"""
import json
import sys
import threading
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port, logpath = int(sys.argv[1]), sys.argv[2]
log = open(logpath, "a", buffering=1)
lock = threading.Lock()
placed: Counter[str] = Counter()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def do_POST(self) -> None:  # noqa: N802
        url = urllib.parse.urlsplit(self.path)
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        key = urllib.parse.parse_qs(url.query).get("id", ["-"])[0]
        if url.path != "/orders":
            with lock:
                log.write(f"OTHER {self.requestline}\n")
            self.send_error(404)
            return
        with lock:
            placed[key] += 1
            n = placed[key]
            log.write(f"POST {key}\n")
        body = json.dumps({"id": key, "n": n}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
server.daemon_threads = True
print("listening", flush=True)
server.serve_forever()
