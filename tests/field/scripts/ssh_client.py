"""Field client: paramiko exec_command loop on one SSH connection.

    python ssh_client.py HOST PORT USER KEYFILE CMDLOG

Each operation runs `echo KEY >> CMDLOG; echo ok-KEY` (so sshd's side counts commands in
CMDLOG) and must read back exactly "ok-KEY": anything else is Garbage, an empty output
(the channel closed under it) is EmptyOutput. After an error the application opens a new
SSHClient at the next operation.
"""
import sys

import paramiko
from fieldops import Garbage, run

host, port, user, keyfile, cmdlog = sys.argv[1], int(sys.argv[2]), *sys.argv[3:6]
client: paramiko.SSHClient | None = None


class EmptyOutput(Exception):
    """The command's channel ended with no output."""


def op(key: str) -> None:
    global client
    if client is None:
        c = paramiko.SSHClient()
        c.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        c.connect(host, port=port, username=user, key_filename=keyfile, look_for_keys=False,
                  allow_agent=False, timeout=5, banner_timeout=5, auth_timeout=5)
        client = c
    _, out, _ = client.exec_command(f"echo {key} >> {cmdlog}; echo ok-{key}", timeout=5)
    text = out.read().decode(errors="replace").strip()
    if not text:
        raise EmptyOutput("no output")
    if text != f"ok-{key}":
        raise Garbage(repr(text[:80]))


def on_error() -> None:
    global client
    if client is not None:
        client.close()
    client = None


run(op, on_error=on_error, pace=0.01)
