"""``python -m resilientsock demo``: the main job, shown in under a minute.

A local message server and a FaultProxy run in this process; an unmodified legacy robot client
(``_scripts/robot_client.py``, plain stdlib) runs twice as a subprocess through the
proxy while seeded
faults fire: once plainly (it dies on the first fault) and once under
``python -m resilientsock``. A third run (docs/design.md §10, §11) puts a session relay in front of
the server, with the faults between client and relay, and runs the client under
``python -m resilientsock --session``: lost 0, duplicates 0, and the server saw one
connection. The server counts every reading it receives, so the table at the end is
measured, not claimed: sent, faults by kind, reconnects, records replayed, duplicates, lost,
connections the server saw. Exit status 0 only when the resilient run lost nothing and the
session run lost nothing, duplicated nothing and used one upstream connection.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import Any

from .testing import FaultProxy, LoopThread, MessageServer

FAULT_KINDS = ("reset", "refuse", "close", "blackhole")
# In a folder of its own: the script's folder becomes sys.path[0], and the package folder
# would shadow the stdlib's _socket with ours.
CLIENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_scripts", "robot_client.py")


def _schedule(seconds: float, kinds: list[str], seed: int) -> list[tuple[float, str]]:
    """Fault times: one every 0.8-1.6 s, kinds in a seeded shuffle (each kind appears)."""
    rng = random.Random(seed)
    out: list[tuple[float, str]] = []
    t = 0.6
    order: list[str] = []
    while t < seconds - 0.5:
        if not order:
            order = list(kinds)
            rng.shuffle(order)
        out.append((round(t, 3), order.pop()))
        t += rng.uniform(0.8, 1.6)
    return out


def _fire(proxy: FaultProxy, kind: str, counts: Counter[str]) -> None:
    import gevent

    counts[kind] += 1
    if kind == "reset":
        proxy.reset_all()
    elif kind == "close":
        proxy.close_all()
    elif kind == "refuse":  # a server restart: connections die, new ones refused for a while
        proxy.refuse(0.8)
        proxy.reset_all()
    elif kind == "blackhole":  # traffic vanishes; only a timeout reveals it
        proxy.blackhole(True)
        gevent.sleep(1.0)
        proxy.blackhole(False)
        proxy.reset_all()


def _run_fault_plan(proxy: FaultProxy, plan: list[tuple[float, str]], counts: Counter[str],
                    stop: list[bool], server: MessageServer) -> None:
    import gevent

    # The plan's clock starts at the client's first reading, not at its launch: on a loaded
    # machine the interpreter's start can take seconds, and faults fired before the client
    # has connected would test its start-up (a session's handshake), not the run.
    while not server.received and not stop[0]:
        gevent.sleep(0.01)
    start = time.monotonic()
    for at, kind in plan:
        delay = at - (time.monotonic() - start)
        if delay > 0:
            gevent.sleep(delay)
        if stop[0]:
            return
        _fire(proxy, kind, counts)


def _one_run(label: str, resilient: bool, count: int, interval: float,
             plan: list[tuple[float, str]], tty: bool, timeout: float,
             session: bool = False) -> dict[str, Any]:
    loop = LoopThread(f"demo-{label}").start()
    server = MessageServer(loop=loop).start()
    relay = None
    if session:
        from .session.relay import Relay

        # plain_after 2 s: this relay serves only session clients, and a black hole delays a
        # reconnecting client's first bytes (docs/session-protocol.md, "Plain clients").
        relay = Relay(("127.0.0.1", 0), server.address, plain_after=2.0).start()
        proxy = FaultProxy(relay.address, loop=loop).start()
    else:
        proxy = FaultProxy(server.address, loop=loop).start()
    counts: Counter[str] = Counter()
    stop = [False]
    stats_path = tempfile.mktemp(prefix="resilientsock-demo-", suffix=".json")
    env = dict(os.environ)
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = pkg_root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable]
    if resilient:
        # The legacy client has a 2 s read timeout; a black-holed link is only revealed by it,
        # so the demo opts in to retrying read timeouts.
        cmd += ["-m", "resilientsock", "--deadline", "20"]
        if session:
            # The relay resumes the byte stream: no read timeout needs retrying, nothing is
            # re-sent, so nothing can arrive twice.
            cmd += ["--session", f"{proxy.address[0]}:{proxy.address[1]}"]
        else:
            cmd += ["--retry-read-timeouts", "1"]
        env["RESILIENTSOCK_STATS_FILE"] = stats_path
    cmd += [CLIENT, proxy.address[0], str(proxy.address[1]), str(count), str(interval)]
    started = time.monotonic()
    loop.spawn(_run_fault_plan, proxy, plan, counts, stop, server)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    last_print = 0.0
    try:
        while proc.poll() is None:
            elapsed = time.monotonic() - started
            if elapsed > timeout:
                proc.kill()
                break
            if tty or elapsed - last_print >= 2.0:
                last_print = elapsed
                _progress(label, len(server.unique()), count, sum(counts.values()), elapsed, tty)
            time.sleep(0.1)  # display cadence only; the subprocess's end is what we wait for
        out, err = proc.communicate(timeout=10)
    finally:
        stop[0] = True
    elapsed = time.monotonic() - started
    _progress(label, len(server.unique()), count, sum(counts.values()), elapsed, tty, final=True)
    received = list(server.received)
    connections = server.connections
    proxy.stop()
    relay_stats = relay.stats() if relay is not None else {}
    if relay is not None:
        relay.stop()
    server.shutdown()
    loop.stop()
    stats: dict[str, Any] = {}
    if resilient and os.path.exists(stats_path):
        with open(stats_path, encoding="utf-8") as fh:
            stats = json.load(fh)
        os.unlink(stats_path)
    last_line = (err.strip().splitlines() or [""])[-1]
    return {
        "label": label, "returncode": proc.returncode, "elapsed": elapsed,
        "unique": len(set(received)), "duplicates": len(received) - len(set(received)),
        "lost": count - len(set(received)), "faults": counts, "stats": stats,
        "error": last_line, "stdout": out.strip(), "connections": connections,
        "relay": relay_stats,
    }


def _progress(label: str, done: int, count: int, faults: int, elapsed: float, tty: bool,
              final: bool = False) -> None:
    width = 30
    filled = int(width * done / count) if count else width
    bar = "#" * filled + "." * (width - filled)
    text = (f"  {label:<10} [{bar}] {done:>4}/{count} acknowledged  "
            f"faults {faults:>2}  {elapsed:5.1f} s")
    if tty:
        sys.stdout.write("\r" + text + ("\n" if final else ""))
    else:
        sys.stdout.write(text + "\n")
    sys.stdout.flush()


def demo_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m resilientsock demo",
        description="Run an unmodified legacy robot client through injected network faults, "
                    "plainly and under resilientsock, and show what each lost.")
    parser.add_argument("--seconds", type=float, default=12.0,
                        help="length of each run in seconds (default 12)")
    parser.add_argument("--seed", type=int, default=7, help="fault schedule seed (default 7)")
    parser.add_argument("--faults", default=",".join(FAULT_KINDS),
                        help=f"comma-separated fault kinds from {', '.join(FAULT_KINDS)} "
                             "(default: all)")
    args = parser.parse_args(argv)
    kinds = [k.strip() for k in args.faults.split(",") if k.strip()]
    bad = [k for k in kinds if k not in FAULT_KINDS]
    if bad or not kinds:
        parser.error(f"--faults: unknown kind(s) {', '.join(bad) or '(none given)'}; "
                     f"choose from {', '.join(FAULT_KINDS)}")
    if not 3 <= args.seconds <= 300:
        parser.error("--seconds must be between 3 and 300")
    interval = 0.02
    count = int(args.seconds / (interval + 0.002))
    plan = _schedule(args.seconds, kinds, args.seed)
    tty = sys.stdout.isatty()
    print(f"resilientsock demo: a robot sends {count} important readings, each acknowledged, "
          f"through a proxy that injects {len(plan)} faults ({', '.join(kinds)}; seed "
          f"{args.seed}).\n")
    print("1) the legacy client, plain python:")
    plain = _one_run("plain", False, count, interval, plan, tty, args.seconds + 30)
    if plain["returncode"] != 0:
        print(f"     died: {plain['error']}")
    print("\n2) the same client, unchanged, under `python -m resilientsock`:")
    resilient = _one_run("resilient", True, count, interval, plan, tty, args.seconds * 3 + 60)
    if resilient["returncode"] != 0:
        print(f"     failed: {resilient['error']}")
    print("\n3) the same client through a session relay, under "
          "`python -m resilientsock --session`:")
    session = _one_run("session", True, count, interval, plan, tty, args.seconds * 3 + 60,
                       session=True)
    if session["returncode"] != 0:
        print(f"     failed: {session['error']}")
    _table(count, plain, resilient, session)
    ok = resilient["returncode"] == 0 and resilient["lost"] == 0
    exact = (session["returncode"] == 0 and session["lost"] == 0
             and session["duplicates"] == 0 and session["connections"] == 1)
    if ok and exact:
        print("\nOK: every reading arrived. Duplicates are the price of at-least-once; through "
              "the relay, every reading arrived exactly once over one server connection.")
    elif ok:
        print("\nFAILED: the session run was not exactly once over one connection (see above).")
    else:
        print("\nFAILED: the resilient run lost readings (see above).")
    raise SystemExit(0 if ok and exact else 1)


def _table(count: int, plain: dict[str, Any], resilient: dict[str, Any],
           session: dict[str, Any]) -> None:
    def faults(run: dict[str, Any]) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(run["faults"].items())) or "none"

    def outcome(run: dict[str, Any], bad: str) -> str:
        return "finished" if run["returncode"] == 0 else bad

    st = resilient["stats"]
    rs = session["relay"]
    rows = [
        ("readings to send", count, count, count),
        ("faults injected", faults(plain), faults(resilient), faults(session)),
        ("client outcome", outcome(plain, "died"), outcome(resilient, "failed"),
         outcome(session, "failed")),
        ("reconnects", "-", st.get("reconnects", 0),
         f"{rs.get('sessions_resumed', 0)} resumes"),
        ("records replayed", "-", st.get("replayed_records", 0), "0 (resumed in place)"),
        ("duplicates delivered", plain["duplicates"], resilient["duplicates"],
         session["duplicates"]),
        ("lost", plain["lost"], resilient["lost"], session["lost"]),
        ("server connections", plain["connections"], resilient["connections"],
         session["connections"]),
        ("time", f"{plain['elapsed']:.1f} s", f"{resilient['elapsed']:.1f} s",
         f"{session['elapsed']:.1f} s"),
    ]
    print()
    w1 = max([len("plain python")] + [len(str(r[1])) for r in rows]) + 2
    w2 = max([len("resilientsock")] + [len(str(r[2])) for r in rows]) + 2
    print(f"  {'':<22}{'plain python':<{w1}}{'resilientsock':<{w2}}session relay")
    for name, a, b, c in rows:
        print(f"  {name:<22}{str(a):<{w1}}{str(b):<{w2}}{c}")
