"""Field server: pyftpdlib, counting MKD and 530 replies (issue #23).

    python ftp_server.py PORT LOG

One user (robot / secret) whose home is LOG's folder + "/home". Every MKD that the server
runs appends "MKD name" to LOG before it answers; every "530" reply (a command on a
connection that did not log in) appends "REPLY530 <reply>": the server's own counts.
"""
import os
import sys

from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler
from pyftpdlib.servers import ThreadedFTPServer

port, logpath = int(sys.argv[1]), sys.argv[2]
home = os.path.join(os.path.dirname(os.path.abspath(logpath)), "home")
os.makedirs(home, exist_ok=True)
log = open(logpath, "a", buffering=1)


class Handler(FTPHandler):
    def ftp_MKD(self, path: str) -> str | None:  # noqa: N802
        log.write(f"MKD {os.path.basename(path.rstrip('/'))}\n")
        return super().ftp_MKD(path)

    def respond(self, resp: str, logfun: object = None) -> None:  # type: ignore[override]
        if resp.startswith("530"):
            log.write(f"REPLY530 {resp}\n")
        if logfun is None:
            super().respond(resp)
        else:
            super().respond(resp, logfun)  # type: ignore[arg-type]


authorizer = DummyAuthorizer()
authorizer.add_user("robot", "secret", home, perm="elradfmwMT")
Handler.authorizer = authorizer
Handler.banner = "field pyftpdlib ready"
server = ThreadedFTPServer(("127.0.0.1", port), Handler)
server.max_cons = 1024
print("listening", flush=True)
server.serve_forever(handle_exit=True)
