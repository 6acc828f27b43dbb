"""Field client: a legacy http.client loop on one keep-alive connection.

    python http_client.py HOST PORT SIZE [CAFILE]

Each operation is GET /blob?id=KEY; the body must be the SIZE-byte blob the server serves
(anything else is Garbage). After an error the application closes the connection;
http.client opens a new one on the next request.
"""
import http.client
import ssl
import sys

from fieldops import Garbage, run

host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
BLOB = bytes(range(256)) * (size // 256)
if len(sys.argv) > 4:
    conn: http.client.HTTPConnection = http.client.HTTPSConnection(
        host, port, timeout=5, context=ssl.create_default_context(cafile=sys.argv[4]))
else:
    conn = http.client.HTTPConnection(host, port, timeout=5)


def op(key: str) -> None:
    conn.request("GET", f"/blob?id={key}")
    resp = conn.getresponse()
    body = resp.read()
    if resp.status != 200 or body != BLOB:
        raise Garbage(f"status {resp.status}, {len(body)} bytes")


run(op, on_error=conn.close)
