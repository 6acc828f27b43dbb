"""Legacy: xmlrpc.client calls over a keep-alive connection."""
import sys
import time
import xmlrpc.client

host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
proxy = xmlrpc.client.ServerProxy(f"http://{host}:{port}/")
for i in range(count):
    assert proxy.add(i, 1) == i + 1
    time.sleep(0.005)
print(f"xmlrpc: {count} ok")
