"""Field client: a POST loop (placing orders), one client object, issue #23.

    python requests_post_client.py URL MODE [CAFILE]

MODE: ``requests`` (a Session with requests' defaults: urllib3 ``Retry(0, read=False)``),
``retry0`` (a Session with ``HTTPAdapter(max_retries=Retry(0))`` mounted), ``urllib3``
(urllib3's ``PoolManager`` with its own defaults: ``Retry(3)``, which re-sends no POST whose
answer was lost, but does re-send after a failed connect).
Each operation POSTs to URL?id=KEY; the answer must be 200 and ``{"id": KEY, "n": 1}`` (an
``n`` of 2 means the order was placed twice: Garbage). No Idempotency-Key: the POST is not
idempotent. The server counts each key's POSTs.
"""
import json
import sys

from fieldops import Garbage, run

url, mode = sys.argv[1], sys.argv[2]
verify = sys.argv[3] if len(sys.argv) > 3 else True
BODY = json.dumps({"item": "widget", "qty": 1}).encode()
HEADERS = {"Content-Type": "application/json"}

if mode == "urllib3":
    import urllib3

    pool = urllib3.PoolManager(ca_certs=verify if verify is not True else None,
                               timeout=urllib3.Timeout(5))

    def post(key: str) -> tuple[int, bytes]:
        r = pool.urlopen("POST", f"{url}?id={key}", body=BODY, headers=HEADERS)
        return r.status, r.data
else:
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    session = requests.Session()
    if mode == "retry0":
        session.mount("http://", HTTPAdapter(max_retries=Retry(0)))
        session.mount("https://", HTTPAdapter(max_retries=Retry(0)))
    elif mode != "requests":
        raise SystemExit(f"unknown mode {mode!r}")

    def post(key: str) -> tuple[int, bytes]:
        r = session.post(url, params={"id": key}, data=BODY, headers=HEADERS, timeout=5,
                         verify=verify)
        return r.status_code, r.content


def op(key: str) -> None:
    status, body = post(key)
    if status != 200:
        raise Garbage(f"status {status}")
    answer = json.loads(body)
    if answer != {"id": key, "n": 1}:
        raise Garbage(f"answer {answer}: the order was placed {answer.get('n')} times")


run(op)
