"""pytest fixtures: ``fault_proxy`` and ``message_server`` (registered via ``pytest11``).

``fault_proxy(upstream)`` starts a FaultProxy in front of ``upstream`` and stops it at the end
of the test; ``message_server`` is a started MessageServer in "ack" mode.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from ._proxy import FaultProxy
from ._servers import MessageServer


@pytest.fixture
def message_server() -> Iterator[MessageServer]:
    server = MessageServer().start()
    try:
        yield server
    finally:
        server.shutdown()


@pytest.fixture
def fault_proxy() -> Iterator[Callable[[tuple[str, int]], FaultProxy]]:
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
