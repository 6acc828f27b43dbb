"""The real-client matrix (docs/design.md §9, §5a "never worse than without"): one client, its real
server, the same seeded fault plan, run plain and under resilientsock, counted server-side.

Rules of this module:

1. The orchestrator (the pytest process) is never patched. The client is a subprocess:
   ``python SCRIPT ARGS`` (plain) or ``python -m resilientsock [OPTIONS] SCRIPT ARGS``; the
   FaultProxy between them runs on its own hub thread. Each mode gets a fresh proxy, a key
   prefix of its own and the same fault plan (the same seed: same kinds, same times).
2. The plan is a cadence, not synchronisation: it starts once the client logged its first
   operation, and the client stops (``$FIELD_STOP``) once it did ``after_ops`` more after the
   last fault. Every wait is bounded; the client is killed at ``row.timeout``.
3. "Never worse" (§5a) is four comparisons, each against the plain run of the same plan:
   resilientsock loses no more (silently: the client was told ok, the server has nothing),
   writes nothing to the wrong place, raises no error type the plain client would not have
   had (its observed types plus the row's documented ones), and never hangs past the
   application's own timeout. Duplicates and recovery time are measured and reported; for a
   row whose operations are not idempotent (``Row.idempotent`` False: INCR, incr) each key's
   executions are counted on the server, and more duplicates than the plain run is worse
   (issue #23: such a request is never re-sent where a dialect knows it, docs/design.md §5).
4. Every run is saved as JSON under ``$FIELD_RESULTS`` (default build/field/) for
   ``tests/field/report.py``, which writes docs/field.md's table; the client's op log and
   output and the server's log are kept beside it (``runs/<row>/``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resilientsock.testing import FaultProxy

from .servers import SCRIPTS, Counts, Server

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(os.environ.get("FIELD_RESULTS", ROOT / "build" / "field"))

# The fault kinds of a plan. cutup:K / cutdown:K arm FaultProxy.cut_after(K, "up"/"down"):
# the next connection to move K more bytes that way is reset there (mid-request / mid-answer);
# a ":new" suffix spares the connections already open (a cut inside the next handshake).
# answer-lost arms FaultProxy.plan.on_response: the next request is handled by the server
# and the client is reset at its answer's first byte (issue #23); answer-lost2 the next two
# answers (a client library's own re-send loses its answer too).
DEFAULT_KINDS = ("reset", "close", "refuse1.0", "cutup:20", "cutdown:200")


@dataclass
class Row:
    """One row of the matrix: a client script against a started server."""

    slug: str  # file name of the results, e.g. "redis-db2"
    title: str  # "redis-py (db=2, requirepass) vs redis-server"
    server: Server
    client: list[str]  # script and args; "{port}" is the proxy's port
    kinds: tuple[str, ...] = DEFAULT_KINDS
    faults: int = 10
    spacing: tuple[float, float] = (0.3, 0.6)  # seconds between faults (picked: a few ops each)
    seed: int = 14
    app_timeout: float = 5.0  # the application's own socket timeout
    # error types the plain client raises under these fault kinds (read from the client's
    # code and confirmed by runs): resilientsock may surface those, nothing else
    plain_errors: frozenset[str] = frozenset()
    rs_opts: list[str] = field(default_factory=lambda: ["--deadline", "10"])
    after_ops: int = 20
    max_ops: int = 3000
    timeout: float = 90.0
    upstream_port: int | None = None  # default: server.port
    at_start: str | None = None  # a fault kind fired before the client starts (e.g. refuse1.0)
    # The row's operations are not idempotent (INCR): the server counts how often each ran
    # (``server.count_counters``), and a key run more often than in the plain run is a worse
    # verdict (issue #23: duplicates are judged, not only measured).
    idempotent: bool = True
    # The client re-sends a request by itself after a connection error (xmlrpc.client's
    # Transport.request): plain runs a call twice whenever a fault lands while it is in flight,
    # so two runs' duplicate counts differ by where the resets and FINs happen to land (8 vs
    # 10 with every duplicate the client's own). Then the verdict counts the duplicates that
    # resilientsock's own re-sends could have made (a key whose operation, or the next one,
    # re-sent records): none is allowed; the client's own are reported (``duplicates``).
    client_resends: bool = False
    # server-side counts (``Counts.other``) where more under resilientsock than plain is a
    # worse verdict: e.g. FTP 530 replies, writes arriving on connections that never logged in
    worse_if_more: tuple[str, ...] = ()
    # a string the note of a surfaced request must hold (e.g. "POST /orders"): the failures
    # whose notes name it are counted (``failed_with_note_naming``)
    note_names: str | None = None

    def plan(self) -> list[tuple[float, str]]:
        """``faults`` (time after start, kind): kinds in a seeded round-robin shuffle."""
        rng = random.Random(self.seed)
        out: list[tuple[float, str]] = []
        order: list[str] = []
        t = 0.3
        for _ in range(self.faults):
            if not order:
                order = list(self.kinds)
                rng.shuffle(order)
            out.append((round(t, 3), order.pop()))
            t += rng.uniform(*self.spacing)
        return out


def fire(proxy: FaultProxy, kind: str) -> Any:
    if kind == "reset":
        return proxy.reset_all()
    if kind == "close":
        return proxy.close_all()
    if kind == "down":  # the server gone for good: every connect refused from now on
        proxy.refuse_now()
        return proxy.reset_all()
    if kind.startswith("refuse"):
        proxy.refuse(float(kind[6:] or 1.0))
        return proxy.reset_all()
    if kind == "answer-lost":  # the next request reaches the server; its answer is reset
        proxy.plan.on_response(1, "reset")
        return "armed"
    if kind == "answer-lost2":  # the next two answers are reset (a re-sent request's too)
        proxy.plan.on_response([1, 2], "reset")
        return "armed"
    if kind.startswith(("cutup:", "cutdown:")):
        name, n, *new = kind.split(":")
        proxy.cut_after(int(n), name[3:], new_only=bool(new))
        return "armed"
    raise ValueError(f"unknown fault kind {kind!r}")


def _lines(path: Path) -> int:
    try:
        with open(path, "rb") as fh:
            return sum(1 for _ in fh)
    except FileNotFoundError:
        return 0


def _wait(pred: Any, timeout: float, proc: subprocess.Popen[str]) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        if proc.poll() is not None:
            return bool(pred())
        time.sleep(0.01)
    return False


_SITECUSTOMIZE = """\
# written by tests/field/matrix.py: import resilientsock from this folder, not from the
# editable install (whose finder sits ahead of PYTHONPATH)
import sys
sys.meta_path[:] = [f for f in sys.meta_path
                    if "__editable__" not in str(getattr(f, "__module__", ""))]
"""


def rs_source() -> tuple[str, str]:
    """(folder to import resilientsock from, commit it is). ``$FIELD_RS_COMMIT`` pins the
    client's resilientsock to a commit (``git archive`` into build/field/rs-<commit>/), so a
    measurement names the code it ran; by default the work tree (commit + "+dirty" if its
    resilientsock/ has uncommitted changes)."""
    pin = os.environ.get("FIELD_RS_COMMIT")
    git = ["git", "-C", str(ROOT)]
    if not pin:
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "?"
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no",
                                "resilientsock"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return str(ROOT), head + ("+dirty" if dirty else "")
    sha = subprocess.run([*git, "rev-parse", "--short", pin], capture_output=True, text=True,
                         timeout=10, check=True).stdout.strip()
    dest = RESULTS / f"rs-{sha}"
    if not (dest / "resilientsock" / "__init__.py").exists():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run([*git, "archive", sha, "resilientsock"], capture_output=True,
                                 timeout=60, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True, timeout=60)
        (dest / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    return str(dest), sha


def run_mode(row: Row, mode: str, workdir: Path) -> dict[str, Any]:
    """Run the row's client once (``mode`` "plain" or "rs") through a fresh FaultProxy."""
    folder = workdir / row.slug / mode
    folder.mkdir(parents=True, exist_ok=True)
    oplog, stop = folder / "ops.jsonl", folder / "stop"
    for p in (oplog, stop):
        p.unlink(missing_ok=True)
    prefix = f"{mode}-{row.slug}-".replace(".", "")
    before = row.server.baseline()
    if hasattr(row.server, "prepare"):  # e.g. the broker declares the mode's queue
        row.server.prepare(prefix)
    upstream = ("127.0.0.1", row.upstream_port or row.server.port)
    with FaultProxy(upstream) as proxy:
        argv = [a.replace("{port}", str(proxy.address[1])) for a in row.client]
        argv[0] = str(SCRIPTS / argv[0])
        env = {k: v for k, v in os.environ.items() if not k.startswith("RESILIENTSOCK_")}
        env.update(FIELD_OPLOG=str(oplog), FIELD_STOP=str(stop), FIELD_PREFIX=prefix,
                   FIELD_MAX_OPS=str(row.max_ops), PYTHONUNBUFFERED="1",
                   PYTHONPATH=str(SCRIPTS) + os.pathsep + rs_source()[0])
        stats_file = folder / "rs_stats.json"
        stats_file.unlink(missing_ok=True)
        if mode == "rs":
            env["RESILIENTSOCK_STATS_FILE"] = str(stats_file)
            cmd = [sys.executable, "-m", "resilientsock", "--stats", *row.rs_opts, *argv]
        else:
            cmd = [sys.executable, *argv]
        if row.at_start:
            fire(proxy, row.at_start)
        out = open(folder / "stdout.txt", "w")
        err = open(folder / "stderr.txt", "w")
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, text=True,
                                cwd=str(folder))
        fired: list[dict[str, Any]] = []
        try:
            def left() -> float:  # every wait of this run fits in row.timeout
                return max(0.0, row.timeout - (time.monotonic() - start))
            _wait(lambda: _lines(oplog) >= 1, min(30.0, left()), proc)
            t0 = time.monotonic()
            for at, kind in row.plan():
                while time.monotonic() - t0 < at and proc.poll() is None and left() > 0:
                    time.sleep(0.005)
                if proc.poll() is not None:
                    break
                fired.append({"ts": round(time.time(), 4), "kind": kind,
                              "hit": fire(proxy, kind)})
            done = _lines(oplog)
            _wait(lambda: _lines(oplog) >= done + row.after_ops,
                  min(row.app_timeout * 4 + 10, left()), proc)
            stop.touch()
            try:
                rc = proc.wait(timeout=max(1.0, left()))
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
            out.close()
            err.close()
        wall = time.monotonic() - start
        proxy_info = {"connections": proxy.connections, "faults": dict(proxy.faults)}
    counts = (row.server.count(prefix, before) if row.idempotent else
              row.server.count_counters(prefix, before))
    ops = [json.loads(ln) for ln in oplog.read_text().splitlines() if ln.strip()] \
        if oplog.exists() else []
    stderr = (folder / "stderr.txt").read_text(errors="replace")
    rs_stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
    return outcome(row, mode, ops, counts, fired, rc, wall, stderr, rs_stats, proxy_info,
                   str(folder))


def outcome(row: Row, mode: str, ops: list[dict[str, Any]], counts: Counts,
            fired: list[dict[str, Any]], rc: int, wall: float, stderr: str,
            rs_stats: dict[str, Any], proxy_info: dict[str, Any],
            folder: str) -> dict[str, Any]:
    ok = [o for o in ops if o["ok"]]
    bad = [o for o in ops if not o["ok"]]
    seen = counts.seen
    # the operation in flight when each fault fired (its duration is the cost of the drop)
    hit = []
    for f in fired:
        for o in ops:
            if o["ts"] - o["dt"] - 0.002 <= f["ts"] <= o["ts"] + 0.002:
                hit.append(o)
                break
    hit_ok = [o["dt"] for o in hit if o["ok"]]
    return {
        "mode": mode, "rc": rc, "wall_s": round(wall, 2),
        "hang": rc in (-9, 137) or wall >= row.timeout,
        "ops": len(ops), "ok": len(ok), "failed": len(bad),
        "lost_silent": sum(1 for o in ok if seen.get(o["key"], 0) == 0),
        "failed_but_applied": sum(1 for o in bad if seen.get(o["key"], 0) > 0),
        "applied": sum(1 for k in seen if seen[k] > 0),
        "unknown_keys": sum(1 for k in seen if k not in {o["key"] for o in ops}),
        "duplicates": sum(1 for k in seen if seen[k] > 1),
        # ... of which resilientsock re-sent records during the key's operation or the next
        "duplicates_after_replay": sum(
            1 for i, o in enumerate(ops) if seen.get(o["key"], 0) > 1
            and (o.get("replayed") or (i + 1 < len(ops) and ops[i + 1].get("replayed")))),
        "max_runs": max(seen.values(), default=0),
        # a key run more than once whose operation the client saw fail: the case
        "duplicated_and_failed": sum(1 for o in bad if seen.get(o["key"], 0) > 1),
        "extra_executions": counts.extra_executions,
        "wrong_place": counts.wrong_place,
        "server": counts.other,
        "errors": dict(Counter(o["exc"] for o in bad)),
        "first_errors": [{k: o.get(k) for k in ("key", "exc", "msg", "notes", "dt", "where")}
                         for o in bad[:4]],
        "unexpected_errors": [{k: o.get(k) for k in ("key", "exc", "msg", "notes", "where")}
                              for o in bad if o["exc"] not in row.plain_errors][:4],
        "error_messages": dict(Counter(f"{o['exc']}: {o.get('msg', '')[:80]}"
                                       for o in bad).most_common(12)),
        # the notes resilientsock put on the errors (does the note name the request?)
        "rs_notes": [n for n, _ in Counter(
            n[:120] for o in bad for n in o.get("notes", [])
            if n.startswith("resilientsock")).most_common(6)],
        "failed_with_note_naming": sum(
            1 for o in bad if row.note_names and any(row.note_names in n
                                                     for n in o.get("notes", []))),
        "failed_with_rs_note": sum(1 for o in bad
                                   if any("resilientsock" in n for n in o.get("notes", []))),
        "max_op_s": max((o["dt"] for o in ops), default=0.0),
        "max_failed_op_s": max((o["dt"] for o in bad), default=0.0),
        "max_failed_op_s_by_type": {e: max(o["dt"] for o in bad if o["exc"] == e)
                                    for e in {o["exc"] for o in bad}},
        "faults_fired": len(fired), "fault_kinds": dict(Counter(f["kind"] for f in fired)),
        "fired": fired,
        "ops_hit_by_a_fault": len(hit),
        "recovery_ms": round(1000 * sum(hit_ok) / len(hit_ok), 1) if hit_ok else None,
        "proxy": proxy_info,
        "rs_stats": {k: v for k, v in rs_stats.items()
                     if k in ("connects", "disconnects", "reconnects", "replayed_records",
                              "answers_resumed", "answers_changed", "surfaced", "gave_up")},
        "tracebacks_in_stderr": stderr.count("Traceback"),
        "rs_log_lines": [ln[:200] for ln in stderr.splitlines()
                         if ln.startswith("resilientsock") and "summary" not in ln][:12],
        "stderr_tail": stderr[-1500:],
        "folder": folder,
    }


def compare(row: Row, plain: dict[str, Any], rs: dict[str, Any]) -> dict[str, Any]:
    """§5a's four comparisons; ``worse`` lists every way resilientsock did worse."""
    worse: list[str] = []
    if rs["lost_silent"] > plain["lost_silent"]:
        worse.append(f"lost silently: {rs['lost_silent']} (plain {plain['lost_silent']})")
    if rs["wrong_place"] > plain["wrong_place"]:
        worse.append(f"written to the wrong place: {rs['wrong_place']} "
                     f"(plain {plain['wrong_place']})")
    allowed = set(plain["errors"]) | set(row.plain_errors)
    new = sorted(set(rs["errors"]) - allowed)
    if new:
        worse.append(f"error types plain would not have had: "
                     f"{ {k: rs['errors'][k] for k in new} }")
    limit = max(row.app_timeout, plain["max_op_s"]) + 2.0  # 2 s: scheduling slack, 2 cores
    if rs["hang"] or rs["max_op_s"] > limit:
        worse.append(f"hangs: slowest operation {rs['max_op_s']} s, limit {limit:.1f} s "
                     f"(app timeout {row.app_timeout} s), killed={rs['hang']}")
    if not row.idempotent and row.client_resends:
        if rs["duplicates_after_replay"]:
            worse.append(f"non-idempotent operations run more than once after resilientsock "
                         f"re-sent records: {rs['duplicates_after_replay']} (all duplicates: "
                         f"{rs['duplicates']}, plain {plain['duplicates']})")
    elif not row.idempotent and rs["duplicates"] > plain["duplicates"]:
        worse.append(f"non-idempotent operations run more than once: {rs['duplicates']} "
                     f"(plain {plain['duplicates']})")
    if not row.idempotent and rs["max_runs"] > max(plain["max_runs"], 1):
        worse.append(f"an operation ran {rs['max_runs']} times (plain at most "
                     f"{plain['max_runs']})")
    for name in row.worse_if_more:
        if rs["server"].get(name, 0) > plain["server"].get(name, 0):
            worse.append(f"server-side {name}: {rs['server'].get(name, 0)} "
                         f"(plain {plain['server'].get(name, 0)})")
    if rs["ops"] == 0:
        worse.append(f"the client did nothing (rc={rs['rc']}): {rs['stderr_tail'][-300:]}")
    recovered = plain["failed"] - rs["failed"]
    return {
        "row": row.slug, "title": row.title, "version": row.server.version,
        "plan": row.plan(), "rs_opts": row.rs_opts, "app_timeout": row.app_timeout,
        "plain": plain, "rs": rs, "worse": worse,
        "recovers": (f"{recovered} of {plain['failed']} operations that failed plain "
                     f"({rs['rs_stats'].get('reconnects', 0)} reconnects, "
                     f"{rs['rs_stats'].get('replayed_records', 0)} records re-sent, "
                     f"{rs['rs_stats'].get('answers_resumed', 0)} answers resumed)"),
    }


CLIENT_DISTS = ("requests", "urllib3", "redis", "PyMySQL", "pymemcache", "paramiko",
                "websocket-client", "websockets", "ldap3", "pyftpdlib", "stomp.py", "gevent")


def client_versions() -> dict[str, str]:
    """The installed versions of the clients (the subprocesses use this interpreter)."""
    from importlib import metadata
    out = {"Python": sys.version.split()[0]}
    for dist in CLIENT_DISTS:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def save(result: dict[str, Any], commit: str | None = None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    result["commit"] = commit or rs_source()[1]
    result["client_versions"] = client_versions()
    result["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    path = RESULTS / f"{result['row']}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    return path


def describe(result: dict[str, Any]) -> str:
    lines = [f"{result['title']} ({result['version']}), plan {result['plan']}"]
    for mode in ("plain", "rs"):
        r = result[mode]
        lines.append(
            f"  {mode:5} ops={r['ops']} ok={r['ok']} failed={r['failed']} lost={r['lost_silent']}"
            f" wrong={r['wrong_place']} dup={r['duplicates']} extra={r['extra_executions']}"
            f" errors={r['errors']} max_op={r['max_op_s']}s recovery={r['recovery_ms']}ms"
            f" server={r['server']} rs={r['rs_stats']} faults={r['proxy']['faults']}")
    lines.append(f"  recovers: {result['recovers']}")
    lines += [f"  WORSE: {w}" for w in result["worse"]]
    return "\n".join(lines)


def run_row(row: Row, workdir: Path) -> dict[str, Any]:
    """Plain, then resilientsock; compare; save; print (visible with -s or on failure)."""
    plain = run_mode(row, "plain", workdir)
    rs = run_mode(row, "rs", workdir)
    result = compare(row, plain, rs)
    save(result)
    keep = RESULTS / "runs" / row.slug  # the evidence, kept past pytest's tmp rotation
    for mode in ("plain", "rs"):
        (keep / mode).mkdir(parents=True, exist_ok=True)
        for name in ("ops.jsonl", "stdout.txt", "stderr.txt"):
            src = workdir / row.slug / mode / name
            if src.exists():
                shutil.copy(src, keep / mode / name)
    for log in (getattr(row.server, "log", None), getattr(row.server, "mainlog", None)):
        if log is not None and Path(log).exists():
            shutil.copy(log, keep / Path(log).name)
    print(describe(result))
    return result


def check(result: dict[str, Any], claim: str, holds: bool) -> None:
    """Record the row's own expected outcome (issue #14 §4) in its saved result."""
    result.setdefault("expected", []).append({"claim": claim, "holds": bool(holds)})
    save(result, result.get("commit"))


def assert_never_worse(result: dict[str, Any]) -> None:
    """Never worse (§5a), and every recorded expectation of the row holds."""
    failed = [e["claim"] for e in result.get("expected", []) if not e["holds"]]
    assert not result["worse"] and not failed, describe(result) + "".join(
        f"\n  EXPECTED, NOT MET: {c}" for c in failed)
