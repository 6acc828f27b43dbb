"""Legacy: poll an HTTPS server over one keep-alive connection (http.client, unchanged)."""
import http.client
import ssl
import sys
import time

host, port, count, cafile = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
ctx = ssl.create_default_context(cafile=cafile)
conn = http.client.HTTPSConnection(host, port, timeout=5, context=ctx)
for i in range(count):
    conn.request("GET", f"/item/{i}")
    resp = conn.getresponse()
    body = resp.read()
    assert resp.status == 200 and body == f"item {i}".encode(), (resp.status, body)
    time.sleep(0.005)
print(f"https: {count} ok; the socket is {type(conn.sock).__name__}")
