"""Legacy: poll an HTTP server over one keep-alive connection (http.client, unchanged).

    python examples/http_poller.py HOST PORT COUNT [CAFILE]

With CAFILE, HTTPS: ``ssl.create_default_context(cafile=CAFILE)`` and ``HTTPSConnection``.
"""
import http.client
import ssl
import sys
import time

host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if len(sys.argv) > 4:
    scheme = "https"
    ctx = ssl.create_default_context(cafile=sys.argv[4])
    conn = http.client.HTTPSConnection(host, port, timeout=5, context=ctx)
else:
    scheme = "http"
    conn = http.client.HTTPConnection(host, port, timeout=5)
for i in range(count):
    conn.request("GET", f"/item/{i}")
    resp = conn.getresponse()
    body = resp.read()
    assert resp.status == 200 and body == f"item {i}".encode(), (resp.status, body)
    time.sleep(0.005)
print(f"{scheme}: {count} ok")
