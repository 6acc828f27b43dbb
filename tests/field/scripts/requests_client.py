"""Field client: requests (urllib3 2.x) GET loop on one Session.

    python requests_client.py URL SIZE [CAFILE]

Each operation is GET URL?id=KEY; the body must be the SIZE-byte blob (else Garbage).
requests' defaults: the pool reconnects by itself on the next request; urllib3 retries
nothing (requests sets max_retries=0).
"""
import sys

import requests
from fieldops import Garbage, run

url, size = sys.argv[1], int(sys.argv[2])
verify = sys.argv[3] if len(sys.argv) > 3 else True
BLOB = bytes(range(256)) * (size // 256)
session = requests.Session()


def op(key: str) -> None:
    resp = session.get(url, params={"id": key}, timeout=5, verify=verify)
    if resp.status_code != 200 or resp.content != BLOB:
        raise Garbage(f"status {resp.status_code}, {len(resp.content)} bytes")


run(op)
