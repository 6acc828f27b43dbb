"""Legacy: fetch with urllib.request (a connection per request)."""
import sys
import time
import urllib.request

host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(count):
    with urllib.request.urlopen(f"http://{host}:{port}/item/{i}", timeout=5) as resp:
        assert resp.read() == f"item {i}".encode()
    time.sleep(0.005)
print(f"urllib: {count} ok")
