"""pytest fixtures: ``resilientsock_fault_proxy`` and ``resilientsock_message_server``
(registered via ``pytest11``).

``resilientsock_fault_proxy(upstream)`` starts a FaultProxy in front of ``upstream`` and stops
it at the end of the test; ``resilientsock_message_server`` is a started MessageServer in "ack"
mode. The prefix keeps them from clashing with a project's own fixtures; the old names
``fault_proxy`` and ``message_server`` still work and warn (DeprecationWarning): a fixture of
the same name in the project's own conftest.py takes precedence over them, as pytest does.

Rule of this module: it imports nothing heavy. The ``pytest11`` entry point loads it into every
pytest session of an environment where resilientsock is installed, so gevent, the servers and
the proxy are imported inside the fixtures, when a test asks for one (``tests/test_plugin.py``
proves it in a fresh process).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from ._proxy import FaultProxy
    from ._servers import MessageServer


@pytest.fixture
def resilientsock_message_server() -> Iterator[MessageServer]:
    """A started MessageServer ("ack" mode) on loopback, shut down after the test."""
    from ._servers import MessageServer

    server = MessageServer().start()
    try:
        yield server
    finally:
        server.shutdown()


@pytest.fixture
def resilientsock_fault_proxy() -> Iterator[Callable[[tuple[str, int]], FaultProxy]]:
    """A factory: ``fault_proxy(upstream)`` starts a FaultProxy in front of ``upstream``;
    every proxy it made is stopped after the test, even when the test failed."""
    from ._proxy import FaultProxy

    proxies: list[FaultProxy] = []

    def make(upstream: tuple[str, int]) -> FaultProxy:
        proxy = FaultProxy(upstream).start()
        proxies.append(proxy)
        return proxy

    try:
        yield make
    finally:
        for proxy in proxies:
            proxy.stop()


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"the {old!r} fixture is deprecated: use {new!r} (resilientsock's fixtures "
                  "are prefixed so that they never clash with a project's own)",
                  DeprecationWarning, stacklevel=2)


@pytest.fixture
def message_server(resilientsock_message_server: MessageServer) -> MessageServer:
    """Deprecated alias of ``resilientsock_message_server``."""
    _deprecated("message_server", "resilientsock_message_server")
    return resilientsock_message_server


@pytest.fixture
def fault_proxy(resilientsock_fault_proxy: Callable[[tuple[str, int]], FaultProxy]
                ) -> Callable[[tuple[str, int]], FaultProxy]:
    """Deprecated alias of ``resilientsock_fault_proxy``."""
    _deprecated("fault_proxy", "resilientsock_fault_proxy")
    return resilientsock_fault_proxy
