"""Write the real-client matrix's measured table into docs/field.md.

    python tests/field/report.py [--results build/field] [--write docs/field.md]

Reads the JSON results ``make field`` left (one per row; the fast subset's ``*-fast`` rows
are skipped) and renders the versions and the outcome table, plain vs resilientsock. With
``--write``, replaces the part of the file between ``<!-- matrix:begin -->`` and
``<!-- matrix:end -->`` (``--tag`` names another section; the prose around it is kept);
without, prints it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ORDER = ["requests-nginx-http", "requests-nginx-https", "requests-nginx-https-retried-connect",
         "httpclient-httpserver", "redis-db2",
         "redis-db2-nopass", "redis-down-for-good", "pymysql-mariadb", "pymysql-mariadb-handshake",
         "pymemcache-memcached", "smtplib-exim", "paramiko-openssh",
         "websocket-client-websockets",
         # issue #23: non-idempotent requests and logins, judged
         "post-requests-nginx-http", "post-retry0-nginx-http", "post-urllib3-nginx-http",
         "post-requests-nginx-https", "post-retry0-nginx-https", "post-requests-httpserver-http",
         "post-retry0-httpserver-http", "redis-incr", "redis-multi-exec", "pymemcache-incr",
         "pymemcache-noreply",
         "xmlrpc-incr", "ftplib-pyftpdlib-noop-loop", "imaplib-dovecot-noop-loop",
         "ldap3-slapd-bind-add", "stomp-rabbitmq-send"]


def _errors(errors: dict[str, int]) -> str:
    if not errors:
        return "none"
    short = {k.replace("requests.exceptions.", "requests.").replace("redis.exceptions.", "redis.")
             .replace("pymysql.err.", "").replace("paramiko.ssh_exception.", "paramiko.")
             .replace("websocket._exceptions.", "ws.").replace("resilientsock._errors.", "rs.")
             .replace("pymemcache.exceptions.", "pymemcache.")
             .replace("ldap3.core.exceptions.", "ldap3.")
             .replace("urllib3.exceptions.", "urllib3."): v for k, v in errors.items()}
    return ", ".join(f"{k} ×{v}" for k, v in sorted(short.items(), key=lambda kv: -kv[1]))


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v:g} ms"


def _cell(r: dict, key: str) -> str:
    v = r.get(key)
    return "n/a" if v is None else str(v)


def render(results: list[dict]) -> str:
    commits = sorted({r.get("commit", "?") for r in results})
    whens = sorted({r.get("when", "?") for r in results})
    versions = next((r["client_versions"] for r in results if r.get("client_versions")), None)
    if versions is None:  # results saved before versions were recorded: this interpreter's
        sys.path.insert(0, str(ROOT / "tests"))
        from field.matrix import client_versions
        versions = client_versions()
    out = [f"Measured on commit(s) {', '.join(f'`{c}`' for c in commits)} of resilientsock, "
           f"{whens[0]}{' – ' + whens[-1] if len(whens) > 1 else ''} "
           f"(2 shared cores, loopback). Clients: "
           f"{', '.join(f'{k} {v}' for k, v in versions.items())}.", "",
           "| row | server version | fault plan (seed 14) |", "|---|---|---|"]
    for r in results:
        kinds: dict[str, int] = {}
        for _, k in r["plan"]:
            kinds[k] = kinds.get(k, 0) + 1
        out.append(f"| {r['title']} | {r['version']} | "
                   f"{', '.join(f'{k} ×{n}' for k, n in kinds.items())} |")
    out += ["", "Counted server-side. *lost*: the client was told ok, the server has nothing. "
            "*wrong place*: applied somewhere the client did not ask for (redis: another db; "
            "MariaDB: another database). *dup*: keys the server applied more than once "
            "(*extra*: executions beyond one per key, from the server's command counters). "
            "*recovery*: mean duration of the operations a fault hit that still succeeded. "
            "*slowest*: the slowest operation (the app's own timeout is 5 s).", "",
            "| row | mode | ops | failed | lost | wrong place | dup (extra) | errors the app saw "
            "| slowest | recovery | server-side notes | never worse? |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        verdict = "yes" if not r["worse"] else "**no**: " + "; ".join(r["worse"])
        for mode in ("plain", "rs"):
            m = r[mode]
            server = ", ".join(f"{k}={v}" for k, v in m["server"].items() if v) or "–"
            out.append(
                f"| {r['title'] if mode == 'plain' else ''} | "
                f"{'plain' if mode == 'plain' else 'resilientsock'} | {m['ops']} | "
                f"{m['failed']} | {m['lost_silent']} | {m['wrong_place']} | "
                f"{m['duplicates']} ({_cell(m, 'extra_executions')}) | {_errors(m['errors'])} | "
                f"{m['max_op_s']:.2f} s | {_ms(m['recovery_ms'])} | {server} | "
                f"{verdict if mode == 'rs' else ''} |")
    out += ["", "Row by row: what resilientsock recovered (its own counters, `--stats`), and "
            "the row's own expected outcome (issue #14 §4):", ""]
    for r in results:
        exp = "; ".join(f"{e['claim']}: {'holds' if e['holds'] else '**not met**'}"
                        for e in r.get("expected", []))
        out.append(f"- **{r['title']}**: recovers {r['recovers']}."
                   + (f" Expected: {exp}." if exp else ""))
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=str(ROOT / "build" / "field"))
    ap.add_argument("--write", default=None, help="the markdown file to update in place")
    ap.add_argument("--tag", default="matrix",
                    help="which marked section to replace: <!-- TAG:begin --> ... "
                         "<!-- TAG:end --> (default matrix)")
    args = ap.parse_args(argv)
    begin, end = f"<!-- {args.tag}:begin -->", f"<!-- {args.tag}:end -->"
    files = [p for p in Path(args.results).glob("*.json") if not p.stem.endswith("-fast")]
    if not files:
        print(f"no results in {args.results}: run `make field` first", file=sys.stderr)
        return 1
    results = [json.loads(p.read_text()) for p in files]
    results.sort(key=lambda r: (ORDER.index(r["row"]) if r["row"] in ORDER else len(ORDER),
                                r["row"]))
    table = render(results)
    if not args.write:
        print(table)
        return 0
    path = Path(args.write)
    text = path.read_text() if path.exists() else f"# The real-client matrix\n\n{begin}\n{end}\n"
    if begin not in text or end not in text:
        text += f"\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{table}{end}{tail}")
    print(f"wrote the matrix ({len(results)} rows) into {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
