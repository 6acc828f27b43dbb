"""Real servers for the pg8000 and pika rows (tests/field/test_never_worse_pg_amqp.py): a
private PostgreSQL cluster with password (SCRAM) logins, and RabbitMQ's AMQP 0-9-1 listener.

Rules of this module (as tests/field/servers.py):

1. A server that is not installed, or cannot start here, makes its row skip with a reason.
2. Each runs from a folder of its own on free loopback ports; nothing is left running.
   PostgreSQL refuses to run as root: run as root, the cluster lives in a folder of its own
   under the system temp dir, owned by the ``postgres`` user, and its commands run through
   ``runuser`` (pytest's tmp_path is root's, mode 0700).
3. Counting is the server's: rows in the table (each operation's unique key), the
   transaction id each row was written in, messages left in the queue, and the server's log.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from .servers import Counts, RabbitMQ, Server, _read_lines, _settle, free_port

# --------------------------------------------------------------------------- postgresql ----

# server log lines that mean a client's bytes reached the wrong place
PG_PROTOCOL = ("invalid frontend message type", "unexpected message", "invalid message length",
               "protocol violation", "invalid length of startup packet",
               "unsupported frontend protocol", "expected SASL response", "malformed SASL",
               "malformed SCRAM", "invalid SCRAM", "unexpected EOF within message")
# a backend whose client vanished mid-message: what a cut does, plain or not
PG_CUT = ("could not receive data from client", "incomplete message from client",
          "incomplete startup packet")


def pg_log_counts(lines: list[str]) -> dict[str, int]:
    """Counts of a PostgreSQL log (log_line_prefix "%m [%p] "). ``auth_rejected``: logins the
    server refused on a connection whose client did not vanish mid-message (a wrong or
    replayed password answer); ``auth_failed_cut``: "password authentication failed" after
    the client's connection was cut inside its SCRAM message (the cut's own effect, the
    same plain and under resilientsock)."""
    by_pid: dict[str, list[str]] = {}
    for ln in lines:
        m = re.match(r"\S+ \S+ \S+ \[(\d+)\] (.*)", ln)
        if m:
            by_pid.setdefault(m.group(1), []).append(m.group(2))
    out = dict.fromkeys(("auth_rejected", "auth_failed_cut", "protocol_errors",
                         "incomplete_startup", "errors", "connections"), 0)
    for msgs in by_pid.values():
        cut = False
        for msg in msgs:
            if any(c in msg for c in PG_CUT):
                cut = True
            if "incomplete startup packet" in msg:
                out["incomplete_startup"] += 1
            if "password authentication failed" in msg:
                out["auth_failed_cut" if cut else "auth_rejected"] += 1
            if any(p in msg for p in PG_PROTOCOL):
                out["protocol_errors"] += 1
            if msg.startswith("ERROR:"):
                out["errors"] += 1
            if "connection authorized" in msg:
                out["connections"] += 1
    return out


class PostgreSQL(Server):
    """A private cluster: ``initdb``, then ``pg_ctl start`` on a free port, TCP on 127.0.0.1
    only, its Unix socket in its own folder; host logins by password (scram-sha-256), so a
    login that a drop broke is an ``auth_failed`` line. Table ``t(k, part, xid)``: one row
    per INSERT, ``xid`` the transaction it ran in."""

    name = "postgresql"
    user, password, db = "field", "field-pw", "field"

    def start(self) -> PostgreSQL:
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        if not bins:
            pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
        self.bin = Path(bins[-1])
        self.as_user: list[str] = []
        self.base = Path(tempfile.mkdtemp(prefix="field-pg-"))
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and there is no postgres user to run PostgreSQL")
            os.chmod(self.base, 0o755)
            os.chown(self.base, pw.pw_uid, pw.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.data, self.sock = self.base / "data", self.base / "sock"
        self.log = self.base / "server.log"
        self._run(["mkdir", "-p", str(self.sock)])
        r = self._run([str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
                       "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8",
                       "--no-sync"], timeout=120)
        if r.returncode != 0:
            pytest.skip(f"initdb failed: {r.stderr[-400:]}")
        self._run(["sh", "-c", f"echo 'local all all trust\nhost all all 127.0.0.1/32 "
                   f"scram-sha-256' > {self.data / 'pg_hba.conf'}"])
        # TLS for clients that ask (SSLRequest): a self-signed certificate, the key the
        # server's own (PostgreSQL refuses a key others can read)
        cert, key = self.base / "server.crt", self.base / "server.key"
        r = self._run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                       "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                      timeout=60)
        tls = (f"-c ssl=on -c ssl_cert_file={cert} -c ssl_key_file={key} "
               if r.returncode == 0 else "")
        self.port = free_port()
        opts = (f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 {tls}"
                "-c log_connections=on -c fsync=off -c max_connections=200 "
                "-c shared_buffers=16MB -c log_min_messages=info")
        r = self._run([str(self.bin / "pg_ctl"), "start", "-w", "-t", "60", "-D",
                       str(self.data), "-l", str(self.log), "-o", opts], timeout=90)
        if r.returncode != 0:
            tail = self.log.read_text(errors="replace")[-600:] if self.log.exists() else ""
            pytest.skip(f"pg_ctl start failed: {r.stderr[-300:]} {tail}")
        self.started = True
        self.version = "PostgreSQL " + subprocess.run(
            [str(self.bin / "postgres"), "--version"], capture_output=True,
            text=True).stdout.split()[2]
        for q in (f"CREATE ROLE {self.user} LOGIN PASSWORD '{self.password}'",
                  f"CREATE DATABASE {self.db} OWNER {self.user}"):
            self.psql(q, db="postgres")
        self.psql(f"SET ROLE {self.user}; CREATE TABLE t (id serial PRIMARY KEY, "
                  "k text NOT NULL, part int NOT NULL, xid xid8 NOT NULL "
                  "DEFAULT pg_current_xact_id()); CREATE INDEX ON t (k)")
        return self

    def _run(self, argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.as_user, *argv], capture_output=True, text=True,
                              timeout=timeout, cwd=str(self.base))

    def psql(self, sql: str, db: str | None = None) -> str:
        r = self._run([str(self.bin / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                       "-h", str(self.sock), "-p", str(self.port), "-U", "postgres", "-d",
                       db or self.db, "-c", sql])
        if r.returncode != 0:
            raise RuntimeError(f"psql {sql!r}: {r.stderr}")
        return r.stdout

    def stop(self) -> None:
        if getattr(self, "started", False):
            self._run([str(self.bin / "pg_ctl"), "stop", "-m", "fast", "-w", "-t", "30", "-D",
                       str(self.data)], timeout=60)
            self.started = False
        base = getattr(self, "base", None)
        if base is not None and base.exists():
            keep = Path(str(self.dir)) / "server.log"
            if self.log.exists():
                shutil.copy(self.log, keep)
            shutil.rmtree(base, ignore_errors=True)
            self.log = keep

    def log_counts(self) -> dict[str, int]:
        return pg_log_counts(_read_lines(self.log))

    def baseline(self) -> dict[str, int]:
        return self.log_counts()

    def count_counters(self, prefix: str, before: dict[str, int]) -> Counts:
        """seen[key]: how often the operation ran (autocommit: its rows; a transaction: the
        transactions that wrote it). ``wrong_place``: rows not written by a whole transaction
        of their operation (a transaction's INSERT that ran outside it, or a transaction
        whose rows are not exactly parts 1 and 2)."""
        like = prefix.replace("_", "\\_") + "%"

        def read() -> str:
            return self.psql(f"SELECT k, part, xid FROM t WHERE k LIKE '{like}' "
                             "ORDER BY id")
        rows = [ln.split("|") for ln in _settle(read).splitlines() if ln.strip()]
        seen: Counter[str] = Counter()
        wrong = 0
        txs: dict[tuple[str, str], list[int]] = {}
        for k, part, xid in rows:
            if part == "0":  # an autocommit INSERT
                seen[k] += 1
            else:
                txs.setdefault((k, xid), []).append(int(part))
        for (k, _xid), parts in txs.items():
            if sorted(parts) == [1, 2]:
                seen[k] += 1
            else:
                wrong += 1
                seen[k] += 0
        now = self.log_counts()
        other = {name: now[name] - before.get(name, 0) for name in now}
        other["rows"] = len(rows)
        return Counts(seen=seen, wrong_place=wrong,
                      extra_executions=sum(max(0, n - 1) for n in seen.values()),
                      other=other)


# -------------------------------------------------------------------------------- amqp ----

class RabbitAMQP(RabbitMQ):
    """RabbitMQ's AMQP 0-9-1 listener (``port``; no plugin): each mode gets queues of its own
    (``PREFIX`` and ``PREFIXsrc``, durable). Counting drains ``PREFIX`` with basic_get:
    ``seen`` key -> copies in the queue (redeliveries apart); ``src_left``: messages left in
    the source queue of a get/consume row. The log (stdout, warning level) is counted for
    protocol errors (``frame_errors``: "invalid frame", "unexpected method",
    "UNEXPECTED_FRAME", "COMMAND_INVALID", "CHANNEL_ERROR") and failed logins."""

    name = "rabbitmq-amqp"
    user, password = "field", "field-pw"

    def start(self) -> RabbitAMQP:
        exe = "/usr/lib/rabbitmq/bin/rabbitmq-server"
        if not os.access(exe, os.X_OK):
            pytest.skip("rabbitmq-server is not installed (apt-get install rabbitmq-server)")
        try:
            import pika  # noqa: F401
        except ImportError:
            pytest.skip("pika is not installed")
        self.port, dist, epmd = free_port(), free_port(), free_port()
        # amqps on a second port when openssl can make a self-signed certificate
        self.tls_port = 0
        cert, key = self.dir / "server.crt", self.dir / "server.key"
        tls = ""
        if subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days",
                           "2", "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out",
                           str(cert)], capture_output=True, timeout=60).returncode == 0:
            self.tls_port = free_port()
            tls = (f"listeners.ssl.1 = 127.0.0.1:{self.tls_port}\n"
                   f"ssl_options.cacertfile = {cert}\nssl_options.certfile = {cert}\n"
                   f"ssl_options.keyfile = {key}\nssl_options.verify = verify_none\n"
                   "ssl_options.fail_if_no_peer_cert = false\n")
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\nloopback_users = none\n{tls}"
            f"default_user = {self.user}\ndefault_pass = {self.password}\n"
            "log.console = true\nlog.console.level = warning\nlog.file = false\n")
        self.env = {**os.environ, "HOME": str(self.dir),
                    "RABBITMQ_NODENAME": f"fieldamqp{self.port}@localhost",
                    "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                    "RABBITMQ_NODE_PORT": str(self.port),
                    "RABBITMQ_DIST_PORT": str(dist), "ERL_EPMD_PORT": str(epmd),
                    "ERL_EPMD_ADDRESS": "127.0.0.1",
                    "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
                    "RABBITMQ_LOG_BASE": str(self.dir / "log"),
                    "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
                    "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq"),
                    "RABBITMQ_PID_FILE": str(self.dir / "rabbit.pid")}
        self.version = "RabbitMQ " + (subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "rabbitmq-server"], capture_output=True,
            text=True).stdout.split("-")[0] or "?") + " (AMQP 0-9-1)"
        self._spawn([exe], ready_timeout=120, env=self.env, start_new_session=True)
        # the port opens before the default user exists: wait for a login (bounded)
        end = time.monotonic() + 60
        while True:
            try:
                self._conn().close()
                break
            except Exception:
                if time.monotonic() > end:
                    raise
                time.sleep(0.5)
        return self

    def _conn(self) -> Any:
        import pika
        return pika.BlockingConnection(pika.ConnectionParameters(
            "127.0.0.1", self.port, credentials=pika.PlainCredentials(self.user, self.password),
            heartbeat=0, blocked_connection_timeout=30, socket_timeout=10))

    def _log_counts(self) -> dict[str, int]:
        lines = _read_lines(self.log)
        frame = ("invalid frame", "unexpected method", "UNEXPECTED_FRAME", "COMMAND_INVALID",
                 "CHANNEL_ERROR", "frame_error", "unexpected_frame", "command_invalid",
                 "channel_error", "handshake_error")
        return {"frame_errors": sum(1 for ln in lines if any(f in ln for f in frame)),
                "auth_failed": sum(1 for ln in lines
                                   if "ACCESS_REFUSED" in ln or "access_refused" in ln
                                   or "login was refused" in ln)}

    def baseline(self) -> dict[str, int]:
        return self._log_counts()

    def prepare(self, prefix: str) -> None:
        conn = self._conn()
        try:
            ch = conn.channel()
            for q in (prefix, prefix + "src"):
                ch.queue_declare(q, durable=True)
                ch.queue_purge(q)
        finally:
            conn.close()

    def count_counters(self, prefix: str, before: dict[str, int]) -> Counts:
        def depth() -> tuple[int, int]:
            conn = self._conn()
            try:
                ch = conn.channel()
                a = ch.queue_declare(prefix, durable=True, passive=True).method.message_count
                b = ch.queue_declare(prefix + "src", durable=True,
                                     passive=True).method.message_count
                return a, b
            finally:
                conn.close()
        _settle(depth)
        conn = self._conn()
        got: list[str] = []
        try:
            ch = conn.channel()
            while True:
                method, _props, body = ch.basic_get(prefix, auto_ack=True)
                if method is None:
                    break
                got.append(body.decode(errors="replace"))
            src_left = ch.queue_declare(prefix + "src", durable=True,
                                        passive=True).method.message_count
        finally:
            conn.close()
        # a key's copies; the broker's redeliveries (marked by the client) count once at
        # most, for a key that has no first delivery: they are AMQP's at-least-once
        # what the queue held, kept for the row's own checks (which key was lost where)
        (self.dir / f"{prefix}drained.txt").write_text("".join(b + "\n" for b in got))
        seen = Counter(b for b in got if b.startswith(prefix) and "|" not in b)
        redelivered = Counter(b.split("|")[0] for b in got if b.endswith("|redelivered"))
        for k in redelivered:
            if k not in seen:
                seen[k] = 1
        now = self._log_counts()
        other = {k: now[k] - before.get(k, 0) for k in now}
        other.update(messages=len(got), src_left=src_left,
                     redelivered=sum(redelivered.values()),
                     foreign=sum(1 for b in got if not b.startswith(prefix)))
        return Counts(seen=seen, extra_executions=sum(n - 1 for n in seen.values()),
                      wrong_place=other["foreign"], other=other)
