"""The pytest11 plugin loads into every pytest session of an environment where resilientsock
is installed: it must import nothing heavy (no gevent) until a test uses one of its fixtures.
Fresh processes each time: this pytest process has long imported gevent itself."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, run_py

CONFTEST = '''
import sys

import pytest

def pytest_configure(config):
    config._gevent_at_configure = "gevent" in sys.modules

@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    config = session.config
    loaded = any(config.pluginmanager.has_plugin(name)  # entry point name, or -p name
                 for name in ("resilientsock", "resilientsock.testing.plugin"))
    with open("report.txt", "w") as fh:
        fh.write(f"plugin={loaded} configure={config._gevent_at_configure} "
                 f"collected={'gevent' in sys.modules}\\n")

def pytest_sessionfinish(session):
    with open("report.txt", "a") as fh:
        fh.write(f"end={'gevent' in sys.modules}\\n")
'''


def _pytest_in(directory: Path, test_source: str) -> tuple[subprocess.CompletedProcess[str], str]:
    (directory / "conftest.py").write_text(CONFTEST)
    (directory / "test_sample.py").write_text(test_source)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # Installed (pip install -e, CI): pytest loads the plugin through its pytest11 entry point,
    # the case that matters. From a bare source tree, name it.
    installed = any(ep.value == "resilientsock.testing.plugin"
                    for ep in importlib.metadata.entry_points(group="pytest11"))
    load = [] if installed else ["-p", "resilientsock.testing.plugin"]
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
         *load, "test_sample.py"], cwd=directory, capture_output=True, text=True, timeout=100,
        env=env)
    return out, (directory / "report.txt").read_text()


def test_importing_the_plugin_imports_no_gevent():
    code = ("import sys\n"
            "import resilientsock.testing.plugin as plugin\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('gevent', 'greenlet', 'ssl', 'asyncio', 'wrapt') or m in "
            "('resilientsock._socket', 'resilientsock.testing._proxy', "
            "'resilientsock.testing._servers'))\n"
            "assert not heavy, heavy\n"
            "assert callable(plugin.resilientsock_message_server)\n"
            "assert callable(plugin.resilientsock_fault_proxy)\n"
            "print('light')\n")
    out = run_py(["-c", code])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "light"


def test_a_pytest_session_that_uses_no_fixture_never_imports_gevent(tmp_path):
    out, report = _pytest_in(tmp_path, "def test_nothing():\n    assert True\n")
    assert out.returncode == 0, out.stdout + out.stderr
    assert report.split() == ["plugin=True", "configure=False", "collected=False", "end=False"]


def test_the_fixtures_still_work_when_used(tmp_path):
    source = ("import socket\n\n"
              "def test_through_the_proxy(resilientsock_message_server,\n"
              "                           resilientsock_fault_proxy):\n"
              "    proxy = resilientsock_fault_proxy(resilientsock_message_server.address)\n"
              "    with socket.create_connection(proxy.address, timeout=10) as s:\n"
              "        s.sendall(b'MSG 1 hello\\n')\n"
              "        assert s.recv(100).startswith(b'ACK 1')\n")
    out, report = _pytest_in(tmp_path, source)
    assert out.returncode == 0, out.stdout + out.stderr
    assert report.split() == ["plugin=True", "configure=False", "collected=False", "end=True"]


def test_the_old_fixture_names_still_work_and_warn(tmp_path):
    source = ("import socket\n\n"
              "def test_old_names(message_server, fault_proxy):\n"
              "    proxy = fault_proxy(message_server.address)\n"
              "    with socket.create_connection(proxy.address, timeout=10) as s:\n"
              "        s.sendall(b'MSG 1 hello\\n')\n"
              "        assert s.recv(100).startswith(b'ACK 1')\n")
    out, _ = _pytest_in(tmp_path, source)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "'message_server' fixture is deprecated" in out.stdout, out.stdout
    assert "'fault_proxy' fixture is deprecated" in out.stdout, out.stdout
