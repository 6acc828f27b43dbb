"""Peer suites: other projects' own test suites, plain, under gevent alone and under resilientsock.

    python peer/run.py [--suites redis,pymysql,urllib3] [--ways plain,gevent,resilientsock]
                       [--timeout 60] [--no-recheck] [--write docs/conformance/peer-suites.md]

For each suite: fetch its tagged source through pip's sdist (pinned below), unpack it under
``peer/.work/`` (gitignored), install its test requirements and this project into a venv of its
own there, start its server on loopback, and run it three ways:

- ``plain``: ``python -m pytest ...``;
- ``gevent``: ``python -c "from gevent import monkey; monkey.patch_all(); ...pytest.main(...)"``;
- ``resilientsock``: ``python -m resilientsock -m pytest ...``.

A test that passes under gevent alone and fails, errors, hangs or is missing under resilientsock
is a **regression**. Before it is reported it runs again alone, twice, under both ways: one that
then passes everywhere is listed as flaky. Exit status: 0 without regressions, 1 with, 2 when a
suite could not be set up.

Rules:

1. Only loopback. Tests that reach other addresses are deselected *before the first run*, in
   every way (``DESELECT`` and the ``-m`` expressions below, each with its reason); the
   ``peer_record`` plugin's audit hook refuses any other non-loopback connect or name lookup
   and reports the test, so a miss is a refused call, never a packet out.
2. Per-test timeout 60 s (pytest-timeout), and a watchdog: a run that writes no outcome for
   the timeout plus a margin is killed, the running test recorded as ``hung``, and the run
   resumed with everything that already ran deselected.
3. The same command line, plugins and servers in every way; only the patching differs.
4. Every wait bounded: servers get a start deadline, runs a total deadline.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / ".work"
WAYS = ("plain", "gevent", "resilientsock")
PASSED = ("pass", "xfail", "xpass")
FAILED = ("fail", "error", "hung", "missing", "blocked")
# --project: a resilientsock source tree put first on PYTHONPATH (ahead of the venvs' editable
# install of this work tree), to measure a committed snapshot while the work tree changes.
PROJECT: list[str] = []
GEVENT_PYTEST = ("from gevent import monkey; monkey.patch_all(); import pytest, sys; "
                 "sys.exit(pytest.main(sys.argv[1:]))")


@dataclass
class Suite:
    name: str
    package: str  # the PyPI name
    version: str  # pinned: what `pip download` resolved on 2026-12-01
    files: list[str]
    extra_args: list[str] = field(default_factory=list)
    deselect: dict[str, str] = field(default_factory=dict)  # node id -> reason
    requirements: list[str] = field(default_factory=list)
    requirements_file: str | None = None
    # Differences from gevent alone that are resilientsock's documented behaviour, not
    # regressions: node id -> why (docs/conformance.md says so too).
    by_design: dict[str, str] = field(default_factory=dict)


# Tests that reach hosts outside this machine, read from the sources (the audit hook in
# peer_record.py catches any that were missed).
REDIS_OCSP = ("connects to public HTTPS hosts (github.com, badssl.com, ...) to check OCSP")
SUITES = {
    "redis": Suite(
        name="redis", package="redis", version="8.1.0",
        files=["tests/test_connection.py", "tests/test_pubsub.py",
               "tests/test_multiprocessing.py", "tests/test_commands.py",
               "tests/test_connection_pool.py", "tests/test_ssl.py"],
        deselect={f"tests/test_ssl.py::TestSSL::{t}": REDIS_OCSP for t in (
            "test_valid_ocsp_cert_http", "test_revoked_ocsp_certificate",
            "test_unauthorized_ocsp", "test_ocsp_not_present_in_response",
            "test_unauthorized_then_direct")},
        requirements_file="dev_requirements.txt",
    ),
    "pymysql": Suite(
        # PyMySQL's sdists and wheels ship no test suite (tests/test_auth.py only, which needs
        # a MySQL 8 server), and this project may not carry another project's code: point
        # PEER_PYMYSQL_TESTS at the pymysql/tests folder of a PyMySQL v1.2.0 checkout; it runs
        # against the 1.2.0 sdist of the same tag. Without it the suite is skipped.
        name="pymysql", package="PyMySQL", version="1.2.0",
        files=["pymysql"],
        requirements=["pytest", "pytest-timeout", "cryptography", "PyNaCl>=1.4.0"],
    ),
    "urllib3": Suite(
        name="urllib3", package="urllib3", version="2.8.0",
        files=["test/with_dummyserver/test_socketlevel.py",
               "test/with_dummyserver/test_chunked_transfer.py"],
        # `requires_network` tests use the tarpit 240.0.0.0 or the internet (none in these two
        # files today; the marker is deselected anyway, as the brief asks).
        extra_args=["-m", "not requires_network"],
        deselect={"test/with_dummyserver/test_socketlevel.py::TestSocketClosing::"
                  "test_connection_refused": "looks up the name 'something.invalid' (a DNS "
                  "query to the machine's resolver)"},
        by_design={"test/with_dummyserver/test_socketlevel.py::TestSocketClosing::"
                   "test_release_conn_param_is_respected_after_timeout_retry":
                   "the server's unanswered EOF is recovered inside recv() (docs/design.md §5), so "
                   "urllib3 never sees it and never opens its own second connection"},
        requirements=["anyio[trio]>=4.8.0", "h2>=4.1.0", "httpx>=0.28.1", "hypercorn>=0.15.0",
                      "pysocks>=1.7.1", "pytest>=8.3.4", "pytest-socket>=0.7.0",
                      "pytest-timeout>=2.3.1", "quart>=0.20.0", "quart-trio>=0.12.0",
                      "trio>=0.27.0", "cryptography>=44.0.2", "idna>=3.10",
                      "trustme>=1.2.1"],
    ),
}


def log(text: str) -> None:
    print(f"[peer {time.strftime('%H:%M:%S')}] {text}", flush=True)


def sh(cmd: list[str], timeout: float = 900, **kw: object) -> None:
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True, timeout=timeout, **kw)  # type: ignore[call-overload]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)  # polling a server start with a deadline, not synchronisation
    raise RuntimeError(f"{what} did not listen on {port} within {timeout} s")


# -- setup -------------------------------------------------------------------------------------

class SuiteUnavailable(Exception):
    """The registries do not serve this suite's tests: named in the report, not an error."""


def fetch(suite: Suite) -> Path:
    """pip download the pinned sdist, unpack it (once), return the source tree."""
    dl = WORK / "sdist"
    dl.mkdir(parents=True, exist_ok=True)
    src_parent = WORK / "src"
    src_parent.mkdir(exist_ok=True)
    stem = f"{suite.package.lower()}-{suite.version}"
    tree = src_parent / stem
    if tree.exists():
        return tree
    archive = dl / f"{stem}.tar.gz"
    if not archive.exists():
        sh([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
            f"{suite.package}=={suite.version}", "-d", str(dl)])
    with tarfile.open(archive) as tf:
        tf.extractall(src_parent, filter="data")
    if suite.name == "pymysql":
        given = os.environ.get("PEER_PYMYSQL_TESTS")
        if not given or not Path(given, "__init__.py").exists():
            shutil.rmtree(tree)
            raise SuiteUnavailable("its tests are not in the PyMySQL 1.2.0 sdist that PyPI "
                                   "serves (set PEER_PYMYSQL_TESTS to the pymysql/tests folder "
                                   "of a PyMySQL v1.2.0 checkout to run it)")
        shutil.copytree(given, tree / "pymysql" / "tests")
    # Upstream PyMySQL has no pytest configuration: without a file of its own here, pytest
    # would climb to this project's pyproject.toml and run the suite under our settings.
    if suite.name == "pymysql":
        (tree / "pytest.ini").write_text("[pytest]\n")
    return tree


def venv(suite: Suite, tree: Path) -> Path:
    """A venv of the suite's own with its test requirements, gevent and this project."""
    env_dir = WORK / f"venv-{suite.name}"
    py = env_dir / "bin" / "python"
    stamp = env_dir / ".installed"
    if stamp.exists():
        return py
    base = getattr(sys, "_base_executable", sys.executable)
    sh([base, "-m", "venv", "--clear", str(env_dir)])
    pip = [str(py), "-m", "pip", "install", "-q"]
    sh([*pip, "--upgrade", "pip"])
    if suite.requirements_file:
        sh([*pip, "-r", str(tree / suite.requirements_file)], timeout=1800)
    if suite.requirements:
        sh([*pip, *suite.requirements], timeout=1800)
    sh([*pip, str(tree)])  # the library itself, from its sdist
    sh([*pip, "-e", str(ROOT)])  # this project (brings gevent)
    sh([*pip, "pytest-timeout"])
    stamp.touch()
    return py


@contextmanager
def redis_servers(tree: Path) -> Iterator[list[str]]:
    """redis-server on a free port, and a TLS instance (certificates from trustme) where the
    redis-server build has TLS; yields the pytest options that point the suite at them."""
    exe = shutil.which("redis-server")
    if not exe:
        raise RuntimeError("redis-server not found (apt-get install redis-server)")
    data = WORK / "redis-data"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    port = free_port()
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "-::1", "--save", "",
            "--appendonly", "no", "--dir", str(data), "--enable-debug-command", "yes",
            "--enable-module-command", "yes"]
    tls_dir = tree / "dockers" / "standalone" / "tls"
    tls_port = free_port()
    _write_tls_files(tls_dir)
    args += ["--tls-port", str(tls_port), "--tls-cert-file", str(tls_dir / "redis.crt"),
             "--tls-key-file", str(tls_dir / "redis.key"),
             "--tls-ca-cert-file", str(tls_dir / "ca.crt"), "--tls-auth-clients", "optional"]
    with open(data / "redis.log", "wb") as logf:
        proc = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT)
    try:
        wait_port(port, proc, "redis-server")
        wait_port(tls_port, proc, "redis-server (TLS)")
        log(f"redis-server {port}, TLS {tls_port}")
        yield [f"--redis-url=redis://localhost:{port}/0",
               f"--redis-ssl-url=rediss://localhost:{tls_port}"]
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _write_tls_files(tls_dir: Path) -> None:
    """The certificate files redis-py's tests/ssl_utils.py looks for (its CI's docker image
    has them; the sdist does not)."""
    import trustme

    tls_dir.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tls_dir / "ca.crt"))
    for stem, cn in (("redis", "localhost"), ("client", "client"), ("test_user", "test_user")):
        cert = ca.issue_cert("localhost", "127.0.0.1", "::1", common_name=cn)
        cert.private_key_pem.write_to_path(str(tls_dir / f"{stem}.key"))
        (tls_dir / f"{stem}.crt").write_bytes(b"".join(b.bytes() for b in cert.cert_chain_pems))


@contextmanager
def mariadb(tree: Path) -> Iterator[list[str]]:
    """mysqld as root, datadir/socket/port of its own; the users and databases PyMySQL's CI
    creates (ci/docker-entrypoint-initdb.d); pymysql/tests/databases.json pointing at them."""
    mysqld = shutil.which("mariadbd") or shutil.which("mysqld")
    install = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
    client = shutil.which("mariadb") or shutil.which("mysql")
    if not (mysqld and install and client):
        raise RuntimeError("MariaDB not found (apt-get install mariadb-server)")
    base = WORK / "mariadb"
    shutil.rmtree(base, ignore_errors=True)
    data = base / "data"
    data.mkdir(parents=True)
    sock = base / "mysqld.sock"
    sh([install, "--no-defaults", f"--datadir={data}", "--user=root",
        "--auth-root-authentication-method=normal", "--skip-test-db"],
       stdout=subprocess.DEVNULL)
    port = free_port()
    with open(base / "mysqld.log", "wb") as logf:
        proc = subprocess.Popen(
            [mysqld, "--no-defaults", f"--datadir={data}", f"--socket={sock}", f"--port={port}",
             "--bind-address=127.0.0.1", "--user=root", f"--pid-file={base / 'mysqld.pid'}",
             "--local-infile=1", "--skip-log-bin", "--innodb-buffer-pool-size=64M"],
            stdout=logf, stderr=subprocess.STDOUT)
    try:
        wait_port(port, proc, "mariadbd")
        sql = """
            create database test1 DEFAULT CHARACTER SET utf8mb4;
            create database test2 DEFAULT CHARACTER SET utf8mb4;
            create user test2 identified by 'some password';
            grant all on test2.* to test2;
            create user test2@localhost identified by 'some password';
            grant all on test2.* to test2@localhost;
            INSTALL SONAME "auth_ed25519";
            CREATE FUNCTION ed25519_password RETURNS STRING SONAME "auth_ed25519.so";
        """
        subprocess.run([client, "--no-defaults", f"--socket={sock}", "-uroot"], input=sql,
                       text=True, check=True, timeout=60)
        dbs = [
            {"host": "localhost", "unix_socket": str(sock), "user": "root", "password": "",
             "database": "test1", "use_unicode": True, "local_infile": True},
            {"host": "127.0.0.1", "port": port, "user": "test2", "password": "some password",
             "database": "test2"},
        ]
        (tree / "pymysql" / "tests" / "databases.json").write_text(json.dumps(dbs))
        log(f"mariadbd {port}, socket {sock}")
        yield []
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


SERVERS: dict[str, Callable[[Path], object]] = {"redis": redis_servers, "pymysql": mariadb}


# -- running -----------------------------------------------------------------------------------

@dataclass
class Run:
    suite: str
    way: str
    outcomes: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)
    wall: float = 0.0
    segments: int = 0
    notes: list[str] = field(default_factory=list)

    def count(self, *outcomes: str) -> int:
        return sum(1 for o in self.outcomes.values() if o in outcomes)


def command(way: str, py: Path) -> list[str]:
    if way == "plain":
        return [str(py), "-m", "pytest"]
    if way == "gevent":
        return [str(py), "-c", GEVENT_PYTEST]
    if way == "resilientsock":
        return [str(py), "-m", "resilientsock", "-m", "pytest"]
    raise ValueError(way)


def run_way(suite: Suite, way: str, py: Path, tree: Path, server_args: list[str],
            timeout: float, only: list[str] | None = None, tag: str = "") -> Run:
    """One way, resumed after each kill until every collected test has an outcome."""
    out_dir = WORK / "results" / suite.name
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{way}{tag}"
    jsonl = out_dir / f"{stem}.jsonl"
    skip_file = out_dir / f"{stem}.skip"
    for p in out_dir.glob(f"{stem}*.xml"):
        p.unlink()
    for p in (jsonl, skip_file):
        if p.exists():
            p.unlink()
    run = Run(suite.name, way)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), *PROJECT]),
               PYTHONDONTWRITEBYTECODE="1")
    for var in list(env):
        if var.startswith("RESILIENTSOCK_"):
            del env[var]
    t_start = time.monotonic()
    total_deadline = t_start + 3 * 3600
    collected = None
    for segment in range(1, 200):
        run.segments = segment
        args = [*command(way, py), f"--rootdir={tree}", "-p", "peer_record",
                f"--peer-out={jsonl}",
                f"--peer-skip={skip_file}", f"--junitxml={out_dir / f'{stem}-{segment}.xml'}",
                # The thread method ends the process on a test past the timeout (resumed
                # below); the signal method raises wherever SIGALRM lands, which under gevent
                # can be a __del__ in the hub and end the session with an INTERNALERROR.
                f"--timeout={timeout:g}", "--timeout-method=thread", "-p", "no:cacheprovider",
                "-q", "-rN",
                "-o", "console_output_style=classic", *suite.extra_args, *server_args]
        for nid in suite.deselect:
            args.append(f"--deselect={nid}")
        args += only if only else suite.files
        log(f"{suite.name} [{way}{tag}] segment {segment}")
        with open(out_dir / f"{stem}.log", "ab") as logf:
            proc = subprocess.Popen(args, cwd=tree, env=env, stdout=logf,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            killed = _watch(proc, jsonl, timeout, total_deadline)
        before = len(run.outcomes)
        done, collected_now = _read(jsonl, run)
        if collected_now is not None and collected is None:
            collected = collected_now
        complete = collected is None or len(run.outcomes) >= collected
        if done and not killed and complete:
            break
        if segment > 1 and len(run.outcomes) == before:
            run.notes.append(f"segment {segment} made no progress; stopped")
            break
        if killed:
            run.notes.append(f"segment {segment} killed by the watchdog ({killed})")
        elif done:
            # pytest ended the session itself (an INTERNALERROR) before every test ran.
            run.notes.append(f"segment {segment} ended the session early (status "
                             f"{proc.returncode})")
        else:
            # pytest-timeout's thread method ends the process on a test past the timeout:
            # the test that was running stays "hung".
            run.notes.append(f"segment {segment} exited early (status {proc.returncode})")
        if time.monotonic() > total_deadline:
            run.notes.append("total deadline reached")
            break
        skip_file.write_text("\n".join(run.outcomes) + "\n")
        if not run.outcomes or (collected is not None and len(run.outcomes) >= collected):
            break
    run.wall = time.monotonic() - t_start
    return run


def _watch(proc: subprocess.Popen[bytes], jsonl: Path, timeout: float,
           total_deadline: float) -> str:
    """Wait for the run; kill its process group when no outcome arrives for timeout + 30 s
    (after a 180 s grace for collection and session setup). Returns why it was killed, or ''."""
    last_size, last_change = -1, time.monotonic()
    started = False
    while True:
        try:
            proc.wait(1.0)
            return ""
        except subprocess.TimeoutExpired:
            pass
        size = jsonl.stat().st_size if jsonl.exists() else 0
        now = time.monotonic()
        if size != last_size:
            if last_size >= 0:
                started = True
            last_size, last_change = size, now
        quiet = now - last_change
        limit = timeout + 30 if started else max(180.0, timeout + 30)
        why = ""
        if quiet > limit:
            why = f"no outcome for {quiet:.0f} s"
        elif now > total_deadline:
            why = "total deadline"
        if why:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
            return why


def _read(jsonl: Path, run: Run) -> tuple[bool, int | None]:
    done, collected = False, None
    if not jsonl.exists():
        return done, collected
    with open(jsonl, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            outcome = rec["outcome"]
            if outcome == "done":
                done = True
            elif outcome == "collected":
                collected = collected if collected is not None else rec["count"]
            elif outcome == "session":
                done = False
            elif outcome == "start":
                run.outcomes.setdefault(rec["id"], "hung")
            else:
                run.outcomes[rec["id"]] = outcome
                run.seconds[rec["id"]] = rec.get("seconds", 0.0)
                run.details[rec["id"]] = rec.get("detail", "")
    return done, collected


def regressions(base: Run, run: Run) -> list[str]:
    return [t for t, o in base.outcomes.items()
            if o in PASSED and run.outcomes.get(t, "missing") not in PASSED]


def recheck(suite: Suite, py: Path, tree: Path, server_args: list[str], timeout: float,
            way: str, tids: list[str]) -> dict[str, tuple[str, str]]:
    """Each failing test alone, twice, under gevent and the way: regression or flaky."""
    verdict: dict[str, tuple[str, str]] = {}
    for i, tid in enumerate(tids[:40]):  # bounded: a mass failure needs no 2x40 reruns
        seen: dict[str, list[str]] = {"gevent": [], way: []}
        for attempt in range(2):
            for w in seen:
                r = run_way(suite, w, py, tree, server_args, timeout, only=[tid],
                            tag=f"-recheck{i}-{attempt}")
                seen[w].append(r.outcomes.get(tid, "missing"))
        ok_base = all(o in PASSED for o in seen["gevent"])
        ok_way = all(o in PASSED for o in seen[way])
        kind = "regression" if ok_base and not ok_way else "flaky"
        verdict[tid] = (kind, f"alone: gevent {seen['gevent']}, {way} {seen[way]}")
    for tid in tids[40:]:
        verdict[tid] = ("regression", "not rechecked (more than 40)")
    return verdict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peer/run.py", description=__doc__.split("\n")[0])
    parser.add_argument("--suites", default="redis,pymysql,urllib3")
    parser.add_argument("--ways", default=",".join(WAYS))
    parser.add_argument("--timeout", type=float, default=60.0, help="per-test timeout (s)")
    parser.add_argument("--no-recheck", action="store_true")
    parser.add_argument("--write", metavar="PATH", help="also write the report as Markdown")
    parser.add_argument("-k", dest="keyword", help="only tests matching (passed to pytest -k)")
    parser.add_argument("--project", metavar="DIR",
                        help="the resilientsock source tree to test (default: this work tree)")
    parser.add_argument("--setup-only", action="store_true",
                        help="fetch the sources and build the venvs, run nothing")
    args = parser.parse_args(argv)
    names = [s.strip() for s in args.suites.split(",") if s.strip()]
    ways = [w.strip() for w in args.ways.split(",") if w.strip()]
    for n in names:
        if n not in SUITES:
            parser.error(f"unknown suite {n!r}: {', '.join(SUITES)}")
    for w in ways:
        if w not in WAYS:
            parser.error(f"unknown way {w!r}: {', '.join(WAYS)}")

    if args.project:
        PROJECT[:] = [str(Path(args.project).resolve())]
    lines: list[str] = []

    def emit(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    started = datetime.datetime.now(datetime.timezone.utc)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    commit = (f"{commit} (work tree)" if not args.project else
              f"{args.project} ({(Path(args.project) / '.commit').read_text().strip()})"
              if (Path(args.project) / ".commit").exists() else args.project)
    status = 0
    results: list[tuple[Suite, dict[str, Run], list[str]]] = []
    not_run: list[str] = []
    for name in names:
        suite = SUITES[name]
        if args.keyword:
            suite.extra_args = [*suite.extra_args, "-k", args.keyword]
        try:
            tree = fetch(suite)
            py = venv(suite, tree)
            if args.setup_only:
                continue
        except SuiteUnavailable as exc:
            log(f"{name}: NOT RUN: {exc}")
            not_run.append(f"- **{name}**: not run: {exc}")
            continue
        except (subprocess.SubprocessError, OSError) as exc:
            log(f"{name}: setup failed: {exc}")
            status = 2
            continue
        with ExitStack() as stack:
            server = SERVERS.get(name)
            try:
                server_args = list(stack.enter_context(server(tree))) if server else []  # type: ignore[call-overload]
            except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
                log(f"{name}: server setup failed: {exc}")
                status = 2
                continue
            runs = {w: run_way(suite, w, py, tree, server_args, args.timeout) for w in ways}
            found: list[str] = []
            if "gevent" in runs and "resilientsock" in runs:
                bad = regressions(runs["gevent"], runs["resilientsock"])
                for tid in [t for t in bad if t in suite.by_design]:
                    bad.remove(tid)
                    found.append(f"by design: {tid}: {suite.by_design[tid]}")
                verdicts = ({t: ("regression", "not rechecked") for t in bad}
                            if args.no_recheck else
                            recheck(suite, py, tree, server_args, args.timeout,
                                    "resilientsock", bad))
                for tid, (kind, why) in verdicts.items():
                    r = runs["resilientsock"]
                    detail = (r.details.get(tid, "").strip().splitlines() or ["no detail"])[-1]
                    found.append(f"{kind}: {tid}: {r.outcomes.get(tid, 'missing')} ({why}; "
                                 f"{detail[:200]})")
            results.append((suite, runs, found))

    emit("# Peer suites: other projects' own tests under resilientsock\n")
    emit(f"- Date: {started:%Y-%m-%d %H:%M} UTC; resilientsock at `{commit}`")
    emit(f"- Python {platform.python_version()}, {platform.system()} {platform.release()}, "
         f"{os.cpu_count()} CPUs; per-test timeout {args.timeout:g} s")
    emit("- Ways: `plain` = `python -m pytest`; `gevent` = `monkey.patch_all()` then "
         "`pytest.main()`; `resilientsock` = `python -m resilientsock -m pytest`.\n")
    emit("| suite | version | way | tests | passed | failed | errors | hung | skipped | "
         "blocked | time | vs gevent |")
    emit("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    total_regressions = 0
    for suite, runs, found in results:
        base = runs.get("gevent")
        for way, r in runs.items():
            ratio = f"{r.wall / base.wall:.2f}×" if base and base.wall else ""
            emit(f"| {suite.name} | {suite.version} | {way} | {len(r.outcomes)} | "
                 f"{r.count(*PASSED)} | {r.count('fail')} | {r.count('error')} | "
                 f"{r.count('hung')} | {r.count('skip')} | {r.count('blocked')} | "
                 f"{r.wall:.1f} s | {ratio} |")
        total_regressions += sum(1 for f in found if f.startswith("regression"))
    emit("")
    emit(f"## Verdict: {total_regressions} regression(s)\n")
    for line in not_run:
        emit(line)
    for suite, runs, found in results:
        emit(f"- **{suite.name}**: {sum(1 for f in found if f.startswith('regression'))}"
             " regression(s)")
        for f in found:
            emit(f"  - {f}")
        for way, r in runs.items():
            for note in r.notes:
                emit(f"  - [{way}] {note}")
            blocked = [t for t, o in r.outcomes.items() if o == "blocked"]
            for t in blocked:
                emit(f"  - [{way}] blocked (non-loopback): {t}: {r.details.get(t, '')[:200]}")
        base = runs.get("gevent")
        res = runs.get("resilientsock")
        if base and res:
            slower = sorted(((res.seconds.get(t, 0) - base.seconds.get(t, 0), t)
                             for t in res.outcomes if t in base.seconds and t in res.seconds),
                            reverse=True)
            slow = [(d, t) for d, t in slower if d > 2.0][:10]
            if slow:
                emit("  - slower under resilientsock than under gevent alone by over 2 s: "
                     + "; ".join(f"`{t}` +{d:.1f} s" for d, t in slow))
    emit("\nDeselected before the first run, in every way (only loopback):\n")
    for suite, _runs, _found in results:
        for nid, why in suite.deselect.items():
            emit(f"- {suite.name}: `{nid}`: {why}")
        if "-m" in suite.extra_args:
            expr = suite.extra_args[suite.extra_args.index("-m") + 1]
            emit(f"- {suite.name}: `-m \"{expr}\"`")
    if args.write:
        Path(args.write).parent.mkdir(parents=True, exist_ok=True)
        Path(args.write).write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"written: {args.write}")
    if total_regressions:
        status = max(status, 1)
    return status


if __name__ == "__main__":
    sys.exit(main())
