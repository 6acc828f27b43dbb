"""Field client: ldap3 BIND + ADD loop on one Connection (issue #23).

    python ldap_client.py HOST PORT BIND_DN PASSWORD BASE

One ``ldap3.Connection`` (SYNC strategy, simple BIND as BIND_DN). Each operation ADDs
``cn=KEY,BASE``; a result other than success raises ``LDAP_<result name>`` (an ADD that ran
twice gets ``entryAlreadyExists``; one on a connection that never bound gets
``strongerAuthRequired`` or ``insufficientAccessRights``). After a failure the application
makes a new Connection and binds again (``on_error``). The server counts each dn's ADDs and
the writes that arrived on connections with no BIND.
"""
import sys

import ldap3
from fieldops import run

host, port, bind_dn, password, base = (sys.argv[1], int(sys.argv[2]), sys.argv[3],
                                       sys.argv[4], sys.argv[5])
server = ldap3.Server(host, port=port, get_info=ldap3.NONE, connect_timeout=5)
_codes: dict[str, type[Exception]] = {}


def connect() -> ldap3.Connection:
    return ldap3.Connection(server, user=bind_dn, password=password, auto_bind=True,
                            receive_timeout=5, raise_exceptions=False)


state: dict[str, ldap3.Connection | None] = {"conn": None}


def op(key: str) -> None:
    if state["conn"] is None:
        state["conn"] = connect()
    conn = state["conn"]
    ok = conn.add(f"cn={key},{base}", ["inetOrgPerson"], {"sn": key, "cn": key})
    if not ok:
        name = f"LDAP_{conn.result.get('description', conn.result.get('result'))}"
        cls = _codes.setdefault(name, type(name, (Exception,), {"__module__": "__main__"}))
        raise cls(str(conn.result)[:200])


def on_error() -> None:
    conn, state["conn"] = state["conn"], None
    if conn is not None:
        try:
            conn.unbind()
        except Exception:
            pass
    state["conn"] = connect()


run(op, on_error)
