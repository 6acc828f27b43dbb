"""Conformance: CPython's own socket test files, three ways, and a verdict.

    python conformance/run.py [--quick] [--files a,b] [--timeout S] [--write docs/conformance.md]

Each file of the interpreter's ``test`` package runs in its own subprocess (``driver.py``),
three ways: (a) ``gevent`` — gevent's monkey-patching alone, the baseline; (b)
``replay-none`` — ``resilientsock.patch(replay="none")``; (c) ``default`` —
``resilientsock.patch()``. A test that passes under (a) and fails, errors, hangs or goes
missing under (b) or (c) is a *regression*. Before it is reported, it is run again alone under
both ways (twice): one that then passes everywhere is listed as flaky instead, with both
outcomes shown. Exit status: 0 without regressions, 1 with, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DRIVER = HERE / "driver.py"
WAYS = ("gevent", "replay-none", "default")
ALL_FILES = ("test_socket", "test_ssl", "test_httplib", "test_urllib2_localnet", "test_smtplib",
             "test_ftplib", "test_poplib", "test_imaplib", "test_xmlrpc", "test_socketserver",
             "test_selectors")
# The CI subset, about 4 minutes on 2 CPUs: the client protocol modules. test_socket, test_ssl,
# test_socketserver and test_imaplib (whose refused-connect tests wait out the default 30 s
# deadline, as retry_connect promises: ~4 minutes on its own) run in `make conformance`.
QUICK_FILES = ("test_httplib", "test_urllib2_localnet", "test_smtplib", "test_ftplib",
               "test_poplib", "test_xmlrpc", "test_selectors")
FAILED = ("fail", "error", "hung", "missing")


@dataclass
class Run:
    file: str
    way: str
    outcomes: dict[str, str] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    timed_out: bool = False
    note: str = ""

    def count(self, outcome: str) -> int:
        return sum(1 for o in self.outcomes.values() if o == outcome)


def run_file(name: str, way: str, timeout: float, only: list[str] | None = None) -> Run:
    """One subprocess: the driver under one way; outcomes read back from its JSONL."""
    with tempfile.NamedTemporaryFile("r", suffix=".jsonl", delete=False) as tmp:
        out_path = tmp.name
    cmd = [sys.executable, str(DRIVER), way, name, out_path]
    if only:
        cmd.append(",".join(only))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("RESILIENTSOCK_STATS_FILE", None)
    run = Run(name, way)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=timeout, env=env, text=True, errors="replace")
        tail = proc.stdout[-1500:]
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired as exc:
        run.timed_out = True
        rc = None
        out = exc.stdout or ""
        tail = (out.decode(errors="replace") if isinstance(out, bytes) else out)[-1500:]
    run.seconds = time.monotonic() - t0
    done = False
    with open(out_path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by the kill
            tid, outcome = rec["id"], rec["outcome"]
            if outcome == "done":
                done = True
                continue
            if outcome == "start":
                run.outcomes.setdefault(tid, "hung")
                continue
            previous = run.outcomes.get(tid)
            if previous in ("fail", "error") and outcome in ("pass", "skip"):
                continue  # a failed subtest fails the test
            run.outcomes[tid] = outcome
            run.details[tid] = rec.get("detail", "")
    os.unlink(out_path)
    if not done:
        # The process died or was killed: the test that was running never finished.
        run.note = "timed out" if run.timed_out else f"exited early (status {rc})"
        for tid, outcome in run.outcomes.items():
            if outcome == "hung" and not run.timed_out:
                run.outcomes[tid] = "error"
                run.details[tid] = "the process died during this test:\n" + tail
    return run


def regressions(runs: dict[str, Run]) -> dict[str, list[str]]:
    """Per way: the tests that pass under gevent alone and do not pass under that way."""
    base = runs["gevent"]
    found: dict[str, list[str]] = {}
    for way, run in runs.items():
        if way == "gevent":
            continue
        bad = []
        for tid, outcome in base.outcomes.items():
            if outcome != "pass":
                continue
            got = run.outcomes.get(tid, "missing")
            if got in FAILED:
                bad.append(tid)
        found[way] = bad
    return found


def recheck(name: str, way: str, tids: list[str], timeout: float) -> dict[str, tuple[str, str]]:
    """Run failing tests alone, twice, under the baseline and the way: confirmed or flaky."""
    verdict: dict[str, tuple[str, str]] = {}
    for tid in tids:
        outcomes = {"gevent": [], way: []}  # type: dict[str, list[str]]
        for _ in range(2):
            for w in outcomes:
                r = run_file(name, w, timeout, only=[tid])
                outcomes[w].append(r.outcomes.get(tid, "missing"))
        base_ok = all(o == "pass" for o in outcomes["gevent"])
        way_ok = all(o == "pass" for o in outcomes[way])
        kind = "regression" if base_ok and not way_ok else "flaky"
        verdict[tid] = (kind, f"alone: gevent {outcomes['gevent']}, {way} {outcomes[way]}")
    return verdict


def _seconds(run: Run, tid: str) -> float | None:
    detail = run.details.get(tid, "")
    if run.outcomes.get(tid) == "pass" and detail.endswith("s"):
        try:
            return float(detail[:-1])
        except ValueError:
            return None
    return None


def _slower(base: Run, run: Run, by: float = 5.0) -> list[tuple[str, float]]:
    """Tests that passed both ways but took ``by`` seconds longer than the baseline."""
    out = []
    for tid in run.outcomes:
        a, b = _seconds(base, tid), _seconds(run, tid)
        if a is not None and b is not None and b - a > by:
            out.append((tid, b - a))
    return sorted(out, key=lambda item: -item[1])


def short(tid: str) -> str:
    return tid.split(".", 2)[-1] if tid.startswith("test.") else tid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="conformance/run.py",
        description="Run CPython's socket test files under gevent alone and under "
                    "resilientsock.patch() (replay off, then defaults); list regressions.")
    parser.add_argument("--quick", action="store_true",
                        help=f"only the CI subset: {', '.join(QUICK_FILES)}")
    parser.add_argument("--files", help="comma-separated test files (default: all of "
                        + ", ".join(ALL_FILES) + ")")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds one file may run under one way (default 900)")
    parser.add_argument("--write", metavar="PATH",
                        help="also write the report as Markdown to PATH (a folder, ending in "
                        "/: PATH/python-X.Y.md)")
    args = parser.parse_args(argv)
    if args.files:
        files = tuple(f.strip() for f in args.files.split(",") if f.strip())
        import test as test_pkg
        for f in files:
            if not (Path(test_pkg.__file__).parent / f"{f}.py").exists():
                parser.error(f"--files: no test file {f!r} in {Path(test_pkg.__file__).parent}")
    else:
        files = QUICK_FILES if args.quick else ALL_FILES
    if args.timeout <= 0:
        parser.error("--timeout must be > 0")

    import gevent

    started = datetime.datetime.now(datetime.timezone.utc)
    lines: list[str] = []

    def emit(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    emit("# Conformance: CPython socket tests under resilientsock.patch()\n")
    emit(f"- Date: {started:%Y-%m-%d %H:%M} UTC")
    emit(f"- Python {platform.python_version()} ({sys.executable}), gevent {gevent.__version__},"
         f" {platform.system()} {platform.release()} {platform.machine()}")
    emit("- Ways: (a) `gevent` = `gevent.monkey.patch_all()` alone, the baseline; "
         "(b) `replay-none` = `resilientsock.patch(replay=\"none\")`; "
         "(c) `default` = `resilientsock.patch()`.")
    from driver import EXCLUDED_RESOURCES, LOOPBACK_ONLY  # noqa: E402 - same folder

    emit("- Resources left out (their tests skip, same in every way): " + "; ".join(
        f"`{r}` ({why})" for r, why in EXCLUDED_RESOURCES.items()))
    emit("- `network` allowed for loopback-only files: " + "; ".join(
        f"{f} ({why})" for f, why in LOOPBACK_ONLY.items()))
    emit("- Tests gevent itself disables (`gevent.testing.patched_tests_setup`) are skipped "
         "with the reason `Removed by patched_tests_setup` in every way.\n")
    emit("| file | way | passed | failed | errors | skipped | hung | time |")
    emit("|---|---|---:|---:|---:|---:|---:|---:|")

    total_regressions: list[str] = []
    flaky: list[str] = []
    slower: list[str] = []
    skip_reasons: dict[str, collections.Counter[str]] = {}
    for name in files:
        runs = {way: run_file(name, way, args.timeout) for way in WAYS}
        for way, run in runs.items():
            emit(f"| {name} | {way} | {run.count('pass')} | {run.count('fail')} | "
                 f"{run.count('error')} | {run.count('skip')} | {run.count('hung')} | "
                 f"{run.seconds:.0f} s{' ' + run.note if run.note else ''} |")
        base = runs["gevent"]
        for way in WAYS[1:]:
            for tid, extra in _slower(base, runs[way]):
                slower.append(f"{name} [{way}] {short(tid)}: +{extra:.1f} s")
        reasons = collections.Counter(
            base.details.get(t, "")[:110] for t, o in base.outcomes.items() if o == "skip")
        skip_reasons[name] = reasons
        for way, tids in regressions(runs).items():
            if not tids:
                continue
            for tid, (kind, why) in recheck(name, way, tids, args.timeout).items():
                entry = f"{name} [{way}] {short(tid)}: {runs[way].outcomes.get(tid, 'missing')}"
                detail = runs[way].details.get(tid, "").strip().splitlines()
                entry += f" ({why}; {detail[-1][:200] if detail else 'no detail'})"
                (total_regressions if kind == "regression" else flaky).append(entry)

    emit("")
    emit(f"## Verdict: {len(total_regressions)} regression(s)\n")
    for entry in total_regressions:
        emit(f"- {entry}")
    if flaky:
        emit("\nFlaky (failed in the full run, then passed alone in both ways):\n")
        for entry in flaky:
            emit(f"- {entry}")
    if slower:
        emit("\nTests that passed but took over 5 s longer than under gevent alone:\n")
        for entry in slower:
            emit(f"- {entry}")
    emit("\n## Why tests skipped (baseline way; the same tests skip in every way)\n")
    for name, reasons in skip_reasons.items():
        if not reasons:
            continue
        emit(f"- **{name}**: " + "; ".join(
            f"{count} × {reason or '(no reason given)'}" for reason, count in
            reasons.most_common(6)) + ("; …" if len(reasons) > 6 else ""))
    if args.write:
        target = Path(args.write)
        if args.write.endswith("/") or target.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            target = target / f"python-{sys.version_info[0]}.{sys.version_info[1]}.md"
        target.write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"written: {target}")
    return 1 if total_regressions else 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
