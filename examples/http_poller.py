"""Legacy: poll an HTTP server over one keep-alive connection (http.client, unchanged)."""
import http.client
import sys
import time

host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
conn = http.client.HTTPConnection(host, port, timeout=5)
for i in range(count):
    conn.request("GET", f"/item/{i}")
    resp = conn.getresponse()
    body = resp.read()
    assert resp.status == 200 and body == f"item {i}".encode(), (resp.status, body)
    time.sleep(0.005)
print(f"http: {count} ok")
