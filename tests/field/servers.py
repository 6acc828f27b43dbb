"""The real servers of the field matrix, each started by this test run on a free loopback
port as its own process, and stopped afterwards.

Rules of this module:

1. A server that is not installed, or cannot start here, makes its row skip with a reason;
   it never fails the run (``make system-deps`` installs them as root).
2. Every server runs from a folder of its own (config, data, logs) under the test's
   ``tmp_path``: nothing outside it is read or written, nothing is left running.
3. Counting is the server's: every ``count(prefix, before)`` reads the server's own state
   (keys, rows, mailbox, the file the commands append to, its access log), never the client's
   output. ``before`` is what ``baseline()`` returned before the run, for counters that only
   go up (command statistics, log lines).
4. Every wait is bounded.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

SCRIPTS = Path(__file__).resolve().parent / "scripts"
BLOB_SIZE = 48 * 1024  # big enough that a cut lands inside the body, small enough to be quick
BLOB = bytes(range(256)) * (BLOB_SIZE // 256)


@dataclass
class Counts:
    """What the server holds for one run: key -> times applied, plus what went elsewhere."""

    seen: Counter[str] = field(default_factory=Counter)
    wrong_place: int = 0  # applied, but somewhere the client did not ask for
    extra_executions: int | None = None  # server-side executions beyond one per key (None: n/a)
    other: dict[str, int] = field(default_factory=dict)  # row-specific server-side counts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find(*names: str) -> str:
    for name in names:
        path = shutil.which(name) or (name if os.path.isabs(name) and os.access(name, os.X_OK)
                                      else None)
        if path is None:
            for d in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
                cand = os.path.join(d, name)
                if os.access(cand, os.X_OK):
                    path = cand
                    break
        if path:
            return path
    pytest.skip(f"{names[0]} is not installed (make system-deps installs it as root)")


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 30.0,
              logs: Path | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            break
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    tail = ""
    if logs is not None and logs.exists():
        tail = logs.read_text(errors="replace")[-800:]
    stop_proc(proc)
    pytest.skip(f"{what} did not start on 127.0.0.1:{port} (rc={proc.poll()}): {tail}")


def stop_proc(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)


class Server:
    """One server process; subclasses say how to start it and how to count."""

    name = "server"

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.version = ""

    def _spawn(self, argv: list[str], log: str = "server.log", ready_timeout: float = 30.0,
               port: int | None = None, **kw: Any) -> None:
        self.log = self.dir / log
        out = open(self.log, "ab")
        self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, **kw)
        out.close()
        wait_port(port or self.port, self.proc, self.name, ready_timeout, self.log)

    def stop(self) -> None:
        if self.proc is not None:
            stop_proc(self.proc)
            self.proc = None

    def baseline(self) -> dict[str, int]:
        return {}

    def count(self, prefix: str, before: dict[str, int]) -> Counts:
        raise NotImplementedError

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _read_lines(path: Path) -> list[str]:
    return path.read_text(errors="replace").splitlines() if path.exists() else []


def _settle(read: Any, timeout: float = 5.0) -> Any:
    """Read a server-side count until two reads 0.2 s apart agree (writes in flight land)."""
    end = time.monotonic() + timeout
    last = read()
    while time.monotonic() < end:
        time.sleep(0.2)
        now = read()
        if now == last:
            return now
        last = now
    return last


# ------------------------------------------------------------------------------- redis ----

class Redis(Server):
    name = "redis"

    def __init__(self, tmp: Path, password: str = "field-pw") -> None:
        self.name = "redis" + ("" if password else "-nopass")
        super().__init__(tmp)
        self.password = password

    def start(self) -> Redis:
        exe = find("redis-server")
        self.port = free_port()
        self.version = subprocess.run([exe, "--version"], capture_output=True,
                                      text=True).stdout.split()[2].removeprefix("v=")
        auth = ["--requirepass", self.password] if self.password else []
        self._spawn([exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", *auth, "--dir", str(self.dir), "--daemonize", "no",
                     "--maxclients", "1000"])
        return self

    def _client(self, db: int = 0) -> Any:
        import redis
        return redis.Redis(port=self.port, db=db, password=self.password or None,
                           socket_timeout=5)

    def baseline(self) -> dict[str, int]:
        stats = self._client().info("commandstats")
        return {"set_calls": int(stats.get("cmdstat_set", {}).get("calls", 0))}

    def count(self, prefix: str, before: dict[str, int]) -> Counts:
        c = Counts()
        for db in range(16):
            keys = [k.decode() for k in self._client(db).scan_iter(match=f"{prefix}*",
                                                                     count=1000)]
            if db == 2:
                c.seen.update(keys)
            else:
                c.wrong_place += len(keys)
                if keys:
                    c.other[f"keys_in_db{db}"] = len(keys)
        set_calls = self.baseline()["set_calls"] - before["set_calls"]
        c.other["set_calls"] = set_calls
        c.extra_executions = max(0, set_calls - len(c.seen) - c.wrong_place)
        return c


    def count_counters(self, prefix: str, before: dict[str, int]) -> Counts:
        """An INCR row (db 2): each key's value is how often its INCR ran."""
        c = Counts()
        for db in range(16):
            client = self._client(db)
            keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
            if db == 2:
                for k in keys:
                    v = client.get(k)
                    if v is not None and v.isdigit() and int(v):
                        c.seen[k.decode()] = int(v)
            elif keys:
                c.wrong_place += len(keys)
                c.other[f"keys_in_db{db}"] = len(keys)
        c.extra_executions = sum(n - 1 for n in c.seen.values())
        return c


# ----------------------------------------------------------------------------- MariaDB ----

class MariaDB(Server):
    name = "mariadb"
    user, password, db = "field", "field-pw", "field"

    def start(self) -> MariaDB:
        exe = find("mariadbd", "mysqld")
        install = find("mariadb-install-db", "mysql_install_db")
        self.version = subprocess.run([exe, "--version"], capture_output=True,
                                      text=True).stdout.split(" Ver ")[-1].split()[0]
        data = self.dir / "data"
        r = subprocess.run([install, "--no-defaults", f"--datadir={data}", "--user=root",
                            "--auth-root-authentication-method=normal", "--skip-test-db"],
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            pytest.skip(f"mariadb-install-db failed: {r.stderr[-400:]}")
        self.port = free_port()
        self.errlog = self.dir / "error.log"
        user = ["--user=root"] if os.geteuid() == 0 else []
        self._spawn([exe, "--no-defaults", f"--datadir={data}", f"--port={self.port}",
                     "--bind-address=127.0.0.1", f"--socket={self.dir / 'sock'}",
                     f"--pid-file={self.dir / 'pid'}", "--skip-log-bin", "--skip-name-resolve",
                     "--innodb-buffer-pool-size=16M", f"--log-error={self.errlog}",
                     "--log-warnings=3", "--max-connections=500", *user], ready_timeout=60)
        import pymysql
        root = pymysql.connect(host="127.0.0.1", port=self.port, user="root", password="",
                               autocommit=True)
        with root.cursor() as cur:
            for q in (f"CREATE DATABASE {self.db}",
                      f"CREATE USER '{self.user}'@'%' IDENTIFIED BY '{self.password}'",
                      f"GRANT ALL ON {self.db}.* TO '{self.user}'@'%'",
                      f"CREATE TABLE {self.db}.t (id INT AUTO_INCREMENT PRIMARY KEY, "
                      "k VARCHAR(64) NOT NULL, INDEX(k))",
                      # the same table elsewhere: a row here is a row in the wrong place
                      "CREATE DATABASE elsewhere",
                      "CREATE TABLE elsewhere.t (id INT AUTO_INCREMENT PRIMARY KEY, "
                      "k VARCHAR(64) NOT NULL)"):
                cur.execute(q)
        root.close()
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            self.greeting_len = len(s.recv(4096))  # where the handshake's second packet starts
        return self

    def _denied(self) -> int:
        return sum(1 for ln in _read_lines(self.errlog) if "Access denied" in ln)

    def baseline(self) -> dict[str, int]:
        return {"access_denied": self._denied()}

    def count(self, prefix: str, before: dict[str, int]) -> Counts:
        import pymysql
        root = pymysql.connect(host="127.0.0.1", port=self.port, user="root", password="",
                               autocommit=True)
        like = prefix.replace("_", "\\_") + "%"

        def read() -> tuple[tuple[Any, ...], ...]:
            with root.cursor() as cur:
                cur.execute(f"SELECT k, COUNT(*) FROM {self.db}.t WHERE k LIKE %s GROUP BY k",
                            (like,))
                return tuple(cur.fetchall())
        rows = _settle(read)
        with root.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM elsewhere.t WHERE k LIKE %s", (like,))
            elsewhere = cur.fetchone()[0]
        root.close()
        c = Counts(seen=Counter({k: n for k, n in rows}), wrong_place=int(elsewhere))
        c.extra_executions = sum(n - 1 for n in c.seen.values())
        c.other["access_denied_1045"] = self._denied() - before["access_denied"]
        return c


# --------------------------------------------------------------------------- memcached ----

class Memcached(Server):
    name = "memcached"

    def start(self) -> Memcached:
        exe = find("memcached")
        self.version = subprocess.run([exe, "-V"], capture_output=True,
                                      text=True).stdout.split()[-1]
        self.port = free_port()
        user = ["-u", "root"] if os.geteuid() == 0 else []
        self._spawn([exe, "-l", "127.0.0.1", "-p", str(self.port), "-U", "0", "-m", "64",
                     "-c", "1024", *user])
        return self

    def _stats(self) -> dict[str, int]:
        from pymemcache.client.base import Client
        c = Client(("127.0.0.1", self.port), timeout=5)
        try:
            return {k.decode(): int(v) for k, v in c.stats().items()
                    if isinstance(v, int)}
        finally:
            c.close()

    def baseline(self) -> dict[str, int]:
        return {"cmd_set": self._stats()["cmd_set"]}

    def count(self, prefix: str, before: dict[str, int]) -> Counts:
        from pymemcache.client.base import Client
        c = Client(("127.0.0.1", self.port), timeout=5)
        # memcached cannot list keys: look up every key the run could have written
        keys = [f"{prefix}{i}" for i in range(int(os.environ.get("FIELD_MAX_OPS", "4000")))]
        found: Counter[str] = Counter()
        for i in range(0, len(keys), 200):
            got = c.get_many(keys[i:i + 200])
            found.update(k for k, v in got.items() if v == k.encode())
        c.close()
        sets = self._stats()["cmd_set"] - before["cmd_set"]
        return Counts(seen=found, extra_executions=max(0, sets - len(found)),
                      other={"set_calls": sets})


    def count_counters(self, prefix: str, before: dict[str, int]) -> Counts:
        """An incr row: each key's value is how often its incr ran."""
        from pymemcache.client.base import Client
        c = Client(("127.0.0.1", self.port), timeout=5)
        keys = [f"{prefix}{i}" for i in range(int(os.environ.get("FIELD_MAX_OPS", "4000")))]
        found: Counter[str] = Counter()
        for i in range(0, len(keys), 200):
            for k, v in c.get_many(keys[i:i + 200]).items():
                if v.strip().isdigit() and int(v):
                    found[k] = int(v)
        c.close()
        return Counts(seen=found, extra_executions=sum(n - 1 for n in found.values()))


# ------------------------------------------------------------------------------- exim ----

EXIM_CONF = """\
# A loopback-only exim for the field matrix: one daemon, no queue runner, every message for
# @field.test appended to one mailbox file. exim gives up root for -C: it runs as its own
# user, so the transport delivers as that user into a folder it can write.
keep_environment =
primary_hostname = field.test
domainlist local_domains = field.test
qualify_domain = field.test
local_interfaces = 127.0.0.1
spool_directory = {dir}/spool
log_file_path = {dir}/log/%slog
tls_advertise_hosts =
host_lookup =
rfc1413_hosts =
log_selector = +subject
acl_smtp_rcpt = acl_rcpt
smtp_accept_max = 500
smtp_accept_max_per_host = 500
smtp_accept_queue_per_connection = 0
begin acl
acl_rcpt:
  accept hosts = 127.0.0.1
  deny
begin routers
local:
  driver = accept
  domains = +local_domains
  transport = mbox
begin transports
mbox:
  driver = appendfile
  file = {dir}/mail/mailbox
  user = {user}
  group = {group}
  mode = 0666
begin retry
* * F,1h,15m
"""


class Exim(Server):
    name = "exim"

    def start(self) -> Exim:
        exe = find("exim4", "exim")
        if os.geteuid() != 0:
            pytest.skip("exim needs to start as root here (it drops to its own user for -C)")
        import grp
        import pwd
        try:
            user = pwd.getpwnam("Debian-exim")
        except KeyError:
            pytest.skip("no Debian-exim user: exim's own user is unknown")
        group = grp.getgrgid(user.pw_gid).gr_name
        self.version = subprocess.run([exe, "-bV"], capture_output=True,
                                      text=True).stdout.split()[2]
        # exim runs as its own user: pytest's tmp folders (mode 0700, root's) are closed to
        # it, so its spool, log and mailbox live in a folder of their own under /tmp
        self.own = Path(tempfile.mkdtemp(prefix="resilientsock-field-exim-"))
        os.chmod(self.own, 0o755)
        for sub in ("spool", "log", "mail"):
            (self.own / sub).mkdir(exist_ok=True)
            os.chown(self.own / sub, user.pw_uid, user.pw_gid)
        conf = self.own / "exim.conf"  # delivery processes re-read it as exim's user
        conf.write_text(EXIM_CONF.format(dir=self.own, user=user.pw_name, group=group))
        self.mainlog = self.own / "log" / "mainlog"
        self.mailbox = self.own / "mail" / "mailbox"
        self.port = free_port()
        # -bdf: the daemon stays in the foreground (so this run owns it); no -q: no queue runner
        self._spawn([exe, "-C", str(conf), "-bdf", "-oX", str(self.port)])
        return self

    def stop(self) -> None:
        super().stop()
        own: Path | None = getattr(self, "own", None)
        if own is not None:
            for name in ("log/mainlog", "log/paniclog", "log/rejectlog", "exim.conf"):
                if (own / name).exists():  # kept for a failed run's report
                    shutil.copy(own / name, self.dir / os.path.basename(name))
            shutil.rmtree(own, ignore_errors=True)
            del self.own

    def _subjects(self, prefix: str) -> Counter[str]:
        return Counter(ln[9:].strip() for ln in _read_lines(self.mailbox)
                       if ln.startswith("Subject: " + prefix))

    def count(self, prefix: str, before: dict[str, int]) -> Counts:
        def state() -> tuple[int, int, int]:
            lines = _read_lines(self.mainlog)
            got = sum(1 for ln in lines if " <= " in ln and f'T="{prefix}' in ln)
            return got, sum(self._subjects(prefix).values()), \
                sum(1 for ln in lines if " == " in ln or " ** " in ln)
        end = time.monotonic() + 20
        while time.monotonic() < end:  # deliveries run in the background: let them finish
            got, delivered, _ = state()
            if delivered >= got:
                break
            time.sleep(0.1)
        got, delivered, deferred = _settle(state)
        seen = self._subjects(prefix)
        return Counts(seen=seen, extra_executions=sum(n - 1 for n in seen.values()),
                      other={"received": got, "delivered": delivered,
                             "deferred_or_failed": deferred})


# --------------------------------------------------------------------------------- sshd ----

SSHD_CONF = """\
# A loopback-only sshd for the field matrix: its own host key and authorized key, no PAM.
Port {port}
ListenAddress 127.0.0.1
HostKey {dir}/host_ed25519
PidFile {dir}/sshd.pid
AuthorizedKeysFile {dir}/authorized_keys
StrictModes no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin prohibit-password
MaxStartups 200:30:400
MaxSessions 200
LogLevel INFO
"""


class Sshd(Server):
    name = "sshd"

    def start(self) -> Sshd:
        exe = find("sshd", "/usr/sbin/sshd")
        keygen = find("ssh-keygen")
        if os.geteuid() != 0:
            pytest.skip("sshd needs root here (privilege separation, login as the caller)")
        self.version = subprocess.run([exe, "-V"], capture_output=True,
                                      text=True).stderr.split(",")[0].strip()
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation dir
        for key in ("host_ed25519", "client_ed25519"):
            subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(self.dir / key)],
                           check=True, timeout=30)
        shutil.copy(self.dir / "client_ed25519.pub", self.dir / "authorized_keys")
        self.keyfile = str(self.dir / "client_ed25519")
        self.user = "root"
        self.cmdlog = self.dir / "commands.log"
        self.cmdlog.touch()
        self.port = free_port()
        conf = self.dir / "sshd_config"
        conf.write_text(SSHD_CONF.format(port=self.port, dir=self.dir))
        self._spawn([exe, "-D", "-e", "-f", str(conf)])
        return self

    def baseline(self) -> dict[str, int]:
        return {"log_lines": len(_read_lines(self.log))}

    def count(self, prefix: str, before: dict[str, int]) -> Counts:
        lines = _settle(lambda: _read_lines(self.cmdlog))
        seen = Counter(ln.strip() for ln in lines if ln.startswith(prefix))
        log = _read_lines(self.log)[before["log_lines"]:]
        bad = [ln for ln in log if re.search(r"[Bb]ad packet|Invalid|invalid format|"
                                                r"[Cc]orrupted|Protocol major|mismatch", ln)]
        return Counts(seen=seen, extra_executions=sum(n - 1 for n in seen.values()),
                      other={"sshd_saw_garbage": len(bad),
                             "sshd_accepted_logins": sum(1 for ln in log
                                                         if "Accepted publickey" in ln)})


# -------------------------------------------------------------------------------- nginx ----

NGINX_CONF = """\
# A loopback-only nginx for the field matrix: one process, a static blob, HTTP and HTTPS.
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    log_format field '$scheme $arg_id $status $bytes_sent';
    access_log {dir}/access.log field;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    keepalive_requests 100000;
    keepalive_timeout 60s;
    server {{
        listen 127.0.0.1:{port};
        listen 127.0.0.1:{tls_port} ssl;
        ssl_certificate {dir}/cert.pem;
        ssl_certificate_key {dir}/key.pem;
        root {dir}/www;
        location /blob {{ default_type application/octet-stream; }}{extra}
    }}
}}
"""


class Nginx(Server):
    name = "nginx"

    def start(self) -> Nginx:
        exe = find("nginx")
        import trustme
        self.version = subprocess.run([exe, "-v"], capture_output=True,
                                      text=True).stderr.strip().split("/")[-1]
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        cert.private_key_pem.write_to_path(str(self.dir / "key.pem"))
        cert.cert_chain_pems[0].write_to_path(str(self.dir / "cert.pem"))
        ca.cert_pem.write_to_path(str(self.dir / "ca.pem"))
        self.cafile = str(self.dir / "ca.pem")
        (self.dir / "www").mkdir(exist_ok=True)
        (self.dir / "tmp").mkdir(exist_ok=True)
        (self.dir / "www" / "blob").write_bytes(BLOB)
        self.port, self.tls_port = free_port(), free_port()
        conf = self.dir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=self.dir, port=self.port, tls_port=self.tls_port,
                                          extra=self.extra_locations()))
        self.access = self.dir / "access.log"
        self._spawn([exe, "-p", str(self.dir), "-c", str(conf)])
        wait_port(self.tls_port, self.proc, "nginx (TLS)", 10, self.log)  # type: ignore[arg-type]
        return self

    def extra_locations(self) -> str:
        return ""

    def count(self, prefix: str, before: dict[str, int]) -> Counts:
        lines = _settle(lambda: _read_lines(self.access))
        seen: Counter[str] = Counter()
        other: Counter[str] = Counter()
        for ln in lines:
            parts = ln.split()
            if len(parts) == 4 and parts[1].startswith(prefix):
                seen[parts[1]] += 1
                if parts[2] != "200":
                    other[f"status_{parts[2]}"] += 1
                elif int(parts[3]) < BLOB_SIZE:
                    other["answers_cut_short"] += 1
            elif len(parts) == 4 and parts[1] == "-":
                other[f"no_id_status_{parts[2]}"] += 1
        return Counts(seen=seen, extra_executions=sum(n - 1 for n in seen.values()),
                      other=dict(other))


# ---------------------------------------------------------- Python's own http.server ----

class HTTPServer(Server):
    name = "http.server"

    def start(self) -> HTTPServer:
        www = self.dir / "www"
        www.mkdir(exist_ok=True)
        (www / "blob").write_bytes(BLOB)
        self.version = "Python " + sys.version.split()[0]
        self.requests = self.dir / "requests.log"
        self.port = free_port()
        self._spawn([sys.executable, str(SCRIPTS / "http_server.py"), str(self.port), str(www),
                     str(self.requests)])
        return self

    def count(self, prefix: str, before: dict[str, int]) -> Counts:
        lines = _settle(lambda: _read_lines(self.requests))
        seen: Counter[str] = Counter()
        bad = 0
        for ln in lines:
            m = re.match(r"GET /blob\?id=(\S+) HTTP/1\.1$", ln)
            if m and m.group(1).startswith(prefix):
                seen[m.group(1)] += 1
            elif not m:
                bad += 1
        return Counts(seen=seen, extra_executions=sum(n - 1 for n in seen.values()),
                      other={"requests_not_understood": bad})


# ------------------------------------------------------------------- websockets server ----

class WebSockets(Server):
    name = "websockets"

    def start(self) -> WebSockets:
        try:
            import websockets
        except ImportError:
            pytest.skip("websockets is not installed (pip install -e '.[field]')")
        self.version = "websockets " + websockets.__version__
        self.messages = self.dir / "messages.log"
        self.port = free_port()
        self._spawn([sys.executable, str(SCRIPTS / "ws_server.py"), str(self.port),
                     str(self.messages)])
        return self

    def baseline(self) -> dict[str, int]:
        return {"log_lines": len(_read_lines(self.messages))}

    def count(self, prefix: str, before: dict[str, int]) -> Counts:
        lines = _settle(lambda: _read_lines(self.messages))
        seen = Counter(ln.strip() for ln in lines if ln.startswith(prefix))
        failed = Counter(ln.split()[0][11:] for ln in lines[before["log_lines"]:]
                         if ln.startswith("!handshake-"))
        return Counts(seen=seen, extra_executions=sum(n - 1 for n in seen.values()),
                      other={"garbage_handshakes": failed["garbage"],
                             "handshakes_cut": failed["cut"],
                             "connections_closed_before_a_request": failed["empty"]})


# ------------------------------------------- counting backends for non-idempotent calls ----

class CountingScript(Server):
    """A Python server script (``tests/field/scripts``) that appends "VERB key" to its log
    before it answers each call: the server's own count of how often each key's call ran
    (issue #23). ``count_counters`` is that count."""

    name = "counting"
    script = ""
    verb = ""

    def start(self) -> CountingScript:
        self.version = "Python " + sys.version.split()[0]
        self.calls = self.dir / "calls.log"
        self.port = free_port()
        self._spawn([sys.executable, str(SCRIPTS / self.script), str(self.port),
                     str(self.calls)])
        return self

    def count_counters(self, prefix: str, before: dict[str, int]) -> Counts:
        lines = _settle(lambda: _read_lines(self.calls))
        seen: Counter[str] = Counter()
        other: Counter[str] = Counter()
        for ln in lines:
            verb, _, key = ln.partition(" ")
            if verb == self.verb and key.startswith(prefix):
                seen[key] += 1
            elif verb != self.verb:  # e.g. "REPLY530 ...": the script's other counts
                other[verb.lower()] += 1
        other["calls"] = sum(seen.values())
        return Counts(seen=seen, extra_executions=sum(n - 1 for n in seen.values()),
                      other=dict(other))


class PostBackend(CountingScript):
    """Orders placed by POST /orders?id=KEY (tests/field/scripts/post_server.py)."""

    name = "post-backend"
    script = "post_server.py"
    verb = "POST"

    def start(self) -> PostBackend:
        super().start()
        self.version = "http.server, Python " + sys.version.split()[0]
        return self


class XMLRPCServer(CountingScript):
    name = "xmlrpc"
    script = "xmlrpc_server.py"
    verb = "INCR"

    def start(self) -> XMLRPCServer:
        super().start()
        self.version = "SimpleXMLRPCServer, Python " + sys.version.split()[0]
        return self


class NginxPost(Nginx):
    """nginx in front of the counting POST backend (``proxy_pass``, HTTP/1.1 keep-alive
    upstream): nginx cannot count POSTs by itself, the backend does. nginx never re-sends a
    POST to its upstream (``proxy_next_upstream`` skips non-idempotent requests)."""

    name = "nginx-post"

    def start(self) -> NginxPost:
        self.backend = PostBackend(self.dir)
        self.backend.start()
        try:
            super().start()
        except BaseException:
            self.backend.stop()
            raise
        self.version = f"nginx {self.version} -> counting backend"
        return self

    def extra_locations(self) -> str:
        return (f"\n        location /orders {{ proxy_pass http://127.0.0.1:{self.backend.port};"
                f" proxy_http_version 1.1; proxy_set_header Connection \"\"; }}")

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            self.backend.stop()

    def count_counters(self, prefix: str, before: dict[str, int]) -> Counts:
        return self.backend.count_counters(prefix, before)


class PyFTPd(CountingScript):
    """pyftpdlib (tests/field/scripts/ftp_server.py): each key's MKD, and "530" replies."""

    name = "pyftpdlib"
    script = "ftp_server.py"
    verb = "MKD"
    user, password = "robot", "secret"

    def start(self) -> PyFTPd:
        try:
            import pyftpdlib
        except ImportError:
            pytest.skip("pyftpdlib is not installed (pip install -e '.[test]')")
        super().start()
        self.version = "pyftpdlib " + pyftpdlib.__ver__
        return self


DOVECOT_CONF = """\
# A loopback-only dovecot for the field matrix: IMAP only, plaintext login, one
# passwd-file user, maildir under this folder; no system service, no include of /etc.
base_dir = {dir}/run
state_dir = {dir}/state
log_path = {dir}/dovecot.log
info_log_path = {dir}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_location = maildir:{dir}/mail/%u
first_valid_uid = 1
mail_max_userip_connections = 1000
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {dir}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={dir}/mail/%u
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
  process_limit = 1000
}}
service imap {{
  process_limit = 1000
}}
"""


class Dovecot(Server):
    """dovecot (imap only) from a folder of its own under /tmp (its auth and mail processes
    run as other users: pytest's 0700 folders are closed to them). Counting: each Subject
    in the user's maildir (an APPEND that ran twice is two messages)."""

    name = "dovecot"
    user, password = "robot", "secret"

    def start(self) -> Dovecot:
        exe = find("dovecot")
        if os.geteuid() != 0:
            pytest.skip("dovecot needs to start as root here")
        import pwd
        try:
            mail = pwd.getpwnam("nobody")
        except KeyError:
            pytest.skip("no user 'nobody' to own the maildir")
        self.version = "dovecot " + subprocess.run([exe, "--version"], capture_output=True,
                                                   text=True).stdout.split()[0]
        self.own = Path(tempfile.mkdtemp(prefix="resilientsock-field-dovecot-"))
        os.chmod(self.own, 0o755)
        (self.own / "mail").mkdir()
        os.chown(self.own / "mail", mail.pw_uid, mail.pw_gid)
        (self.own / "passwd").write_text(f"{self.user}:{{PLAIN}}{self.password}::::::\n")
        os.chmod(self.own / "passwd", 0o644)
        self.port = free_port()
        conf = self.own / "dovecot.conf"
        conf.write_text(DOVECOT_CONF.format(dir=self.own, port=self.port, uid=mail.pw_uid,
                                            gid=mail.pw_gid))
        self.maildir = self.own / "mail" / self.user
        self._spawn([exe, "-F", "-c", str(conf)])
        return self

    def stop(self) -> None:
        super().stop()
        own: Path | None = getattr(self, "own", None)
        if own is not None:
            for name in ("dovecot.log", "dovecot.conf"):
                if (own / name).exists():  # kept for a failed run's report
                    shutil.copy(own / name, self.dir / name)
            shutil.rmtree(own, ignore_errors=True)
            del self.own

    def _subjects(self, prefix: str) -> Counter[str]:
        seen: Counter[str] = Counter()
        for sub in ("new", "cur"):
            folder = self.maildir / sub
            if not folder.is_dir():
                continue
            for f in folder.iterdir():
                for ln in f.read_text(errors="replace").splitlines():
                    if ln.startswith("Subject: " + prefix):
                        seen[ln[9:].strip()] += 1
                    if not ln:
                        break
        return seen

    def count_counters(self, prefix: str, before: dict[str, int]) -> Counts:
        seen = _settle(lambda: self._subjects(prefix))
        return Counts(seen=seen, extra_executions=sum(n - 1 for n in seen.values()))


SLAPD_CONF = """\
# A loopback-only slapd for the field matrix: one mdb database, a root DN with a password;
# anonymous users may read but not write (a write on a connection that never did the BIND
# is refused, and counted from the stats log).
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
pidfile {dir}/slapd.pid
argsfile {dir}/slapd.args
modulepath /usr/lib/ldap
moduleload back_mdb
database mdb
maxsize 104857600
suffix "{suffix}"
rootdn "{rootdn}"
rootpw {password}
directory {dir}/db
access to * by users write by anonymous auth by * read
"""


class Slapd(Server):
    """OpenLDAP's slapd (``-d stats``: every operation logged with its connection), from a
    folder of its own. Counting, from the log: each key's ADD (a second ADD of a dn is a
    duplicate), and ``writes_unbound``: writes on a connection with no successful BIND."""

    name = "slapd"
    suffix = "dc=field,dc=test"
    rootdn = "cn=admin,dc=field,dc=test"
    password = "field-secret"

    def start(self) -> Slapd:
        exe = find("slapd")
        slapadd = find("slapadd")
        if not Path("/etc/ldap/schema/inetorgperson.schema").exists():
            pytest.skip("the OpenLDAP schemas are not installed")
        self.version = "slapd " + subprocess.run(
            [exe, "-VV"], capture_output=True, text=True).stderr.split("slapd ")[-1].split()[0]
        (self.dir / "db").mkdir(exist_ok=True)
        conf = self.dir / "slapd.conf"
        conf.write_text(SLAPD_CONF.format(dir=self.dir, suffix=self.suffix, rootdn=self.rootdn,
                                          password=self.password))
        base = self.dir / "base.ldif"
        base.write_text(f"dn: {self.suffix}\nobjectClass: dcObject\nobjectClass: organization\n"
                        f"dc: field\no: field\n\ndn: ou=orders,{self.suffix}\n"
                        f"objectClass: organizationalUnit\nou: orders\n")
        r = subprocess.run([slapadd, "-f", str(conf), "-l", str(base)], capture_output=True,
                           text=True, timeout=60)
        if r.returncode:
            pytest.skip(f"slapadd failed: {r.stderr[-400:]}")
        self.port = free_port()
        self._spawn([exe, "-d", "stats", "-f", str(conf), "-h",
                     f"ldap://127.0.0.1:{self.port}/"])
        return self

    def count_counters(self, prefix: str, before: dict[str, int]) -> Counts:
        lines = _settle(lambda: _read_lines(self.log))
        bound: set[str] = set()  # connections whose BIND succeeded
        binds: dict[str, str] = {}  # "conn op" -> dn of a BIND in flight
        seen: Counter[str] = Counter()
        other: Counter[str] = Counter()
        add_re = re.compile(r"conn=(\d+) op=(\d+) (ADD|MOD|DEL|MODRDN) dn=\"([^\"]*)\"")
        bind_re = re.compile(r"conn=(\d+) op=(\d+) BIND dn=\"([^\"]*)\" method")
        res_re = re.compile(r"conn=(\d+) op=(\d+) RESULT tag=97 err=(\d+)")
        for ln in lines:
            m = bind_re.search(ln)
            if m:
                binds[f"{m[1]} {m[2]}"] = m[3]
                bound.discard(m[1])  # a new BIND resets the connection's identity
                continue
            m = res_re.search(ln)
            if m and f"{m[1]} {m[2]}" in binds:
                if m[3] == "0" and binds.pop(f"{m[1]} {m[2]}"):
                    bound.add(m[1])
                continue
            m = add_re.search(ln)
            if m:
                rdn = m[4].split(",")[0].partition("=")[2]
                if not rdn.startswith(prefix):
                    continue
                if m[3] == "ADD":
                    seen[rdn] += 1
                if m[1] not in bound:
                    other["writes_unbound"] += 1
        other["adds"] = sum(seen.values())
        return Counts(seen=seen, extra_executions=sum(n - 1 for n in seen.values()),
                      other=dict(other))


class RabbitMQ(Server):
    """RabbitMQ with its STOMP plugin, from a folder of its own (its own node name, Erlang
    port mapper port, cookie, data and log; stdout is the log). Counting: each mode's queue
    is drained by a STOMP subscriber of this process after a sentinel message (FIFO, one
    consumer: the sentinel comes last); ``error_frames``: "STOMP error frame sent" lines."""

    name = "rabbitmq"
    user, password = "guest", "guest"

    def start(self) -> RabbitMQ:
        exe = find("/usr/lib/rabbitmq/bin/rabbitmq-server")
        try:
            import stomp  # noqa: F401
        except ImportError:
            pytest.skip("stomp.py is not installed (pip install -e '.[field]')")
        self.port, amqp, dist, epmd = free_port(), free_port(), free_port(), free_port()
        (self.dir / "enabled_plugins").write_text("[rabbitmq_stomp].\n")
        (self.dir / "rabbitmq.conf").write_text(
            f"stomp.listeners.tcp.1 = 127.0.0.1:{self.port}\nlisteners.tcp.1 = "
            f"127.0.0.1:{amqp}\nloopback_users = none\nlog.console = true\n"
            f"log.console.level = warning\nlog.file = false\n")
        self.env = {**os.environ, "HOME": str(self.dir),
                    "RABBITMQ_NODENAME": f"field{self.port}@localhost",
                    "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1", "RABBITMQ_NODE_PORT": str(amqp),
                    "RABBITMQ_DIST_PORT": str(dist), "ERL_EPMD_PORT": str(epmd),
                    "ERL_EPMD_ADDRESS": "127.0.0.1",
                    "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
                    "RABBITMQ_LOG_BASE": str(self.dir / "log"),
                    "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
                    "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq"),
                    "RABBITMQ_PID_FILE": str(self.dir / "rabbit.pid")}
        self.version = "RabbitMQ " + (subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "rabbitmq-server"], capture_output=True,
            text=True).stdout.split("-")[0] or "?") + " (STOMP plugin)"
        # the broker takes seconds to boot (more on a loaded machine): a generous bound
        self._spawn([exe], ready_timeout=120, env=self.env, start_new_session=True)
        return self

    def stop(self) -> None:
        proc = self.proc
        if proc is not None:
            try:
                stop_proc(proc, timeout=60)
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # beam and its helpers
                except ProcessLookupError:
                    pass
                self.proc = None
            epmd = shutil.which("epmd") or "/usr/lib/erlang/bin/epmd"
            if os.access(epmd, os.X_OK):
                subprocess.run([epmd, "-kill"], env=self.env, capture_output=True, timeout=30)

    def baseline(self) -> dict[str, int]:
        return {"error_frames": sum("error frame" in ln for ln in _read_lines(self.log))}

    def prepare(self, prefix: str) -> None:
        """Declare the mode's queue (a SEND to a queue nobody declared is dropped by the
        broker): a SUBSCRIBE to /queue/NAME declares it durable; the subscription ends."""
        import stomp
        conn = stomp.Connection([("127.0.0.1", self.port)], heartbeats=(0, 0), timeout=10)
        conn.connect(self.user, self.password, wait=True, headers={"host": "/"})
        try:
            conn.subscribe("/queue/" + prefix, id="declare", ack="auto",
                           headers={"durable": "true", "auto-delete": "false",
                                    "exclusive": "false"})
            conn.unsubscribe(id="declare")
        finally:
            conn.disconnect(receipt="declared")

    def count_counters(self, prefix: str, before: dict[str, int]) -> Counts:
        import stomp
        done = threading.Event()
        got: list[str] = []
        sentinel = f"sentinel-{prefix}"

        class Drain(stomp.ConnectionListener):
            def on_message(self, frame: Any) -> None:
                if frame.body == sentinel:
                    done.set()
                else:
                    got.append(frame.body)

        conn = stomp.Connection([("127.0.0.1", self.port)], heartbeats=(0, 0), timeout=10)
        conn.set_listener("drain", Drain())
        conn.connect(self.user, self.password, wait=True, headers={"host": "/"})
        try:
            queue = "/queue/" + prefix
            conn.subscribe(queue, id="drain", ack="auto")
            conn.send(queue, sentinel)
            if not done.wait(60):
                raise AssertionError(f"the sentinel of {queue} did not come back in 60 s")
        finally:
            conn.disconnect()
        seen = Counter(b for b in got if b.startswith(prefix))
        frames = self.baseline()["error_frames"] - before["error_frames"]
        return Counts(seen=seen, extra_executions=sum(n - 1 for n in seen.values()),
                      other={"error_frames": frames, "messages": len(got)})


class MemcachedNoreply(Memcached):
    """The noreply row's count: a key is "seen" when it holds "new", the other client's newer
    value, which it wrote after the operation's own get had read "old" back: an operation the
    client saw succeed whose key holds "old" (or nothing) lost that newer value (``lost``:
    an older noreply set replayed over it). ``old`` counts every key left at "old" (also
    those of failed operations, where the other client never wrote)."""

    name = "memcached-noreply"

    def count(self, prefix: str, before: dict[str, int]) -> Counts:
        from pymemcache.client.base import Client
        c = Client(("127.0.0.1", self.port), timeout=5)
        keys = [f"{prefix}{i}" for i in range(int(os.environ.get("FIELD_MAX_OPS", "4000")))]
        found: Counter[str] = Counter()
        values: Counter[str] = Counter()
        for i in range(0, len(keys), 200):
            for k, v in _settle(lambda: c.get_many(keys[i:i + 200])).items():  # noqa: B023
                if v == b"new":
                    found[k] = 1
                values[v.decode(errors="replace")] += 1
        c.close()
        return Counts(seen=found, other={"old": values["old"], "new": values["new"]})
