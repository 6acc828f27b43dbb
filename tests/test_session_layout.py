"""The shape of session mode's code (resilientsock/session/, issue #25 item 7), checked.

Read from the source (no import needed, microseconds a test): the package's import graph has no
cycle, gevent's internals appear in ``session/carrier.py`` only (behind ``_Hub``), and
``session/targets.py`` imports neither gevent nor the client. Plus the carrier's link lock,
which refuses the states the comments used to forbid.
"""

from __future__ import annotations

import ast
import pathlib

import gevent.socket as gsocket
import pytest
from conftest import ROOT, run_py

from resilientsock.session import protocol as sp
from resilientsock.session.carrier import _LinkIO

PACKAGE = ROOT / "resilientsock"
SESSION = PACKAGE / "session"

# What the rest of session/ must not touch: gevent's private modules and the private
# attributes of its sockets and hub (``_Hub`` in carrier.py wraps each of them).
GEVENT_INTERNALS = {"_sock", "_read_event", "_write_event", "_wait", "hub", "get_hub", "loop"}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every module of the package -> the package's modules it imports (lazily or not)."""
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in paths}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            base = package.split(".")[:len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            # ``from . import x`` imports x, not the package's __init__ again
            own = [target] if node.module else []
            for candidate in own + [f"{target}.{a.name}" for a in node.names]:
                if candidate in paths and candidate != name:
                    graph[name].add(candidate)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as a path, or None."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_the_package_import_graph_has_no_cycle() -> None:
    graph = _imports()
    assert "resilientsock.session.targets" in graph["resilientsock._socket"]
    assert "resilientsock._patching" not in graph["resilientsock._socket"]
    assert _cycle(graph) is None, _cycle(graph)


def test_the_session_modules_depend_downwards_only() -> None:
    graph = _imports()
    inside = {m: {d for d in deps if d.startswith("resilientsock.session.")}
              for m, deps in graph.items() if m.startswith("resilientsock.session.")}
    s = "resilientsock.session."
    assert inside[s + "protocol"] == set()
    assert inside[s + "targets"] == set()
    assert inside[s + "carrier"] == {s + "protocol"}
    assert s + "client" not in inside[s + "relay"] and s + "relay" not in inside[s + "client"]


@pytest.mark.parametrize("module", sorted(p.name for p in SESSION.glob("*.py")))
def test_gevent_internals_only_in_the_carrier_adapter(module: str) -> None:
    tree = ast.parse((SESSION / module).read_text())
    private = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
               and node.module and node.module.startswith("gevent._")]
    touched = sorted({node.attr for node in ast.walk(tree)
                      if isinstance(node, ast.Attribute) and node.attr in GEVENT_INTERNALS})
    if module == "carrier.py":
        hub = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "_Hub")
        inside = {node.attr for node in ast.walk(hub) if isinstance(node, ast.Attribute)
                  and node.attr in GEVENT_INTERNALS}
        assert set(touched) == inside, "gevent internals used outside _Hub"
        return
    assert not private and not touched, (private, touched)


def test_targets_import_neither_gevent_nor_the_client() -> None:
    out = run_py(["-c", "import sys, resilientsock.session.targets as t\n"
                        "t.set_session_targets(['h:1'])\n"
                        "assert t.is_session_target(('h', 1))\n"
                        "print(sorted(m for m in sys.modules if m.startswith('gevent') or\n"
                        "             m.startswith('resilientsock.session.')))"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["['resilientsock.session.targets']"]


def test_a_link_lock_is_taken_new_without_waiting_and_released_once() -> None:
    a, b = gsocket.socketpair()
    try:
        lio = _LinkIO(a, sp.Link(sp.CLIENT))
        lio.take_new()
        assert lio.wlock.locked()
        with pytest.raises(AssertionError):
            lio.take_new()  # held already: a second writer would have waited (and yielded)
        lio.wlock.release()
        with pytest.raises(ValueError):
            lio.wlock.release()  # released twice: two writers each thought they held it
    finally:
        a.close()
        b.close()


def test_the_design_docs_code_map_names_every_session_file() -> None:
    text = (ROOT / "docs" / "design.md").read_text()
    code_map = text[text.index("  session/ "):]
    for path in sorted(SESSION.glob("*.py")):
        if path.name != "__init__.py":
            assert f"    {path.name} " in code_map[:2000], path.name
