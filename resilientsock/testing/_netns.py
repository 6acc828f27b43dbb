"""NetnsPair: real kernel network faults between two Linux network namespaces.

A proxy can reset, close and stall connections; it cannot make the kernel say ``ENETUNREACH``
or let a link die silently. Two namespaces joined by a veth pair can::

    with NetnsPair() as net:            # client 10.77.1.1 <-veth-> server 10.77.1.2
        server = net.popen("server", [sys.executable, "-m", "resilientsock.testing"], ...)
        client = net.popen("client", [sys.executable, "-m", "resilientsock", "robot.py", ...])
        net.delete_route()              # client: connect() -> ENETUNREACH
        net.restore_route()
        net.client_link(up=False)       # client link down (Linux gives ENETUNREACH too)
        net.blackhole(True)             # server side of the veth down: silence both ways

Needs root and iproute2 (``ip``). ``NetnsPair.unavailable()`` says why it cannot run here, for
a skip reason. Names are unique per process and instance, so parallel runs do not collide,
and ``close()`` (also on failure: use ``with``) deletes both namespaces, which destroys the
veth pair, and the namespace's ``/etc/netns`` folder. Addresses are the same in every pair:
namespaces do not share them.

``tc netem`` would be the textbook black hole; kernels without the ``sch_netem`` module (this
project's CI machines among them) cannot load it, so ``blackhole()`` takes the server's end
of the veth down instead: the client's link stays up, its packets vanish, nothing answers.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

_counter = itertools.count(1)
PREFIX = "10.77.1"


class NetnsError(RuntimeError):
    """An ``ip`` command failed; the message holds the command and its stderr."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc


class NetnsPair:
    """Client and server network namespaces joined by one veth pair (see module docstring)."""

    client_ip = f"{PREFIX}.1"
    server_ip = f"{PREFIX}.2"

    def __init__(self) -> None:
        tag = f"rs{os.getpid() % 100000}x{next(_counter)}"
        self.client_ns = f"{tag}-c"
        self.server_ns = f"{tag}-s"
        self.client_dev = f"{tag}c"[:15]  # interface names are at most 15 bytes
        self.server_dev = f"{tag}s"[:15]
        self._created: list[str] = []

    @staticmethod
    def unavailable() -> str | None:
        """Why a NetnsPair cannot be built here (a skip reason), or None if it can."""
        if not sys.platform.startswith("linux"):
            return "network namespaces are Linux only"
        if os.geteuid() != 0:
            return "network namespaces need root (CI runs as root)"
        if shutil.which("ip") is None:
            return "iproute2's `ip` command is missing"
        probe = f"rsprobe{os.getpid()}"
        if _ip("netns", "add", probe, check=False).returncode != 0:
            return "`ip netns add` failed (no CAP_SYS_ADMIN in this container?)"
        _ip("netns", "del", probe, check=False)
        return None

    # -- lifecycle -------------------------------------------------------------------------

    def open(self) -> NetnsPair:
        try:
            for ns in (self.client_ns, self.server_ns):
                _ip("netns", "add", ns)
                self._created.append(ns)
                _ip("-n", ns, "link", "set", "lo", "up")
            _ip("link", "add", self.client_dev, "netns", self.client_ns, "type", "veth",
                "peer", "name", self.server_dev, "netns", self.server_ns)
            _ip("-n", self.client_ns, "addr", "add", f"{self.client_ip}/24", "dev", self.client_dev)
            _ip("-n", self.server_ns, "addr", "add", f"{self.server_ip}/24", "dev", self.server_dev)
            _ip("-n", self.client_ns, "link", "set", self.client_dev, "up")
            _ip("-n", self.server_ns, "link", "set", self.server_dev, "up")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Delete both namespaces (and so the veth pair) and the hosts folder. Idempotent."""
        while self._created:
            _ip("netns", "del", self._created.pop(), check=False)
        shutil.rmtree(self._etc(self.client_ns), ignore_errors=True)

    def __enter__(self) -> NetnsPair:
        return self.open()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- running things inside -------------------------------------------------------------

    def command(self, side: str, args: list[str]) -> list[str]:
        """``args`` prefixed so they run in the client's or the server's namespace."""
        return ["ip", "netns", "exec", self._ns(side), *args]

    def popen(self, side: str, args: list[str], **kwargs: Any) -> subprocess.Popen[str]:
        kwargs.setdefault("text", True)
        return subprocess.Popen(self.command(side, args), **kwargs)

    # -- faults ----------------------------------------------------------------------------

    def delete_route(self) -> None:
        """The client loses its route to the server: connects fail with ENETUNREACH."""
        _ip("-n", self.client_ns, "route", "del", f"{PREFIX}.0/24", "dev", self.client_dev)

    def restore_route(self) -> None:
        _ip("-n", self.client_ns, "route", "replace", f"{PREFIX}.0/24", "dev", self.client_dev,
            "src", self.client_ip)

    def client_link(self, up: bool) -> None:
        """Take the client's interface down (its routes go with it) or back up."""
        _ip("-n", self.client_ns, "link", "set", self.client_dev, "up" if up else "down")

    def blackhole(self, on: bool) -> None:
        """Silence both ways: the server's end of the veth goes down, the client's stays up."""
        _ip("-n", self.server_ns, "link", "set", self.server_dev, "down" if on else "up")

    def add_server_address(self, address: str) -> None:
        _ip("-n", self.server_ns, "addr", "add", f"{address}/24", "dev", self.server_dev)

    def set_client_hosts(self, text: str) -> None:
        """The client namespace's /etc/hosts (``ip netns exec`` mounts /etc/netns/NS/hosts).

        Written in place, so processes started earlier see the change on their next lookup
        (a bind mount pins the file, not the name)."""
        folder = self._etc(self.client_ns)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "hosts"
        with open(path, "a+", encoding="ascii") as f:
            f.seek(0)
            f.truncate()
            f.write(text)

    # -- helpers ---------------------------------------------------------------------------

    def _ns(self, side: str) -> str:
        if side not in ("client", "server"):
            raise ValueError(f"side must be 'client' or 'server', got {side!r}")
        return self.client_ns if side == "client" else self.server_ns

    @staticmethod
    def _etc(ns: str) -> Path:
        return Path("/etc/netns") / ns
