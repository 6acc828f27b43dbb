"""Field client: xmlrpc.client ``incr`` loop on one ServerProxy (issue #23).

    python xmlrpc_client.py URL

Each operation is ``incr(KEY)`` on a fresh key. xmlrpc.client re-sends a request once by
itself after a reset (``Transport.request``), so the plain client may run it twice; a third
run (the answer 3) is never the plain client's: Garbage. The server counts each key's runs.
"""
import sys
import xmlrpc.client

from fieldops import Garbage, run

proxy = xmlrpc.client.ServerProxy(sys.argv[1])


def op(key: str) -> None:
    n = proxy.incr(key)
    if n not in (1, 2):
        raise Garbage(f"incr {key} answered {n}: it ran {n} times")


run(op)
