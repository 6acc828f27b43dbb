"""A Toxiproxy-compatible HTTP control API for FaultProxy (``ToxiproxyAPI``).

It speaks the subset of Toxiproxy's REST API (api.go in Shopify/toxiproxy) that clients use:

    GET    /version                            {"version": ...}
    POST   /reset                              enable every proxy, remove every toxic -> 204
    GET    /proxies                            {name: proxy, ...}
    POST   /proxies                            create -> 201 proxy (409 if the name exists)
    POST   /populate                           create or replace a list -> 201 {"proxies": [...]}
    GET    /proxies/{proxy}                    proxy (404 if none)
    POST   /proxies/{proxy}   (or PATCH)       change listen / upstream / enabled -> proxy
    DELETE /proxies/{proxy}                    -> 204
    GET    /proxies/{proxy}/toxics             [toxic, ...]
    POST   /proxies/{proxy}/toxics             add -> 200 toxic (as Toxiproxy: 200, not 201)
    GET    /proxies/{proxy}/toxics/{toxic}     toxic
    POST   /proxies/{proxy}/toxics/{toxic}     (or PATCH) change attributes / toxicity -> toxic
    DELETE /proxies/{proxy}/toxics/{toxic}     -> 204

Rules of this module:

1. JSON shapes, defaults and errors are Toxiproxy's: a proxy is ``{name, listen, upstream,
   enabled, toxics}``, a toxic ``{name, type, stream, toxicity, attributes}``; an error is
   ``{"error": message, "status": code}`` with 400 (bad body, missing field, invalid type or
   stream), 404 (no such proxy or toxic), 409 (name in use), 403 for a browser's User-Agent
   (Toxiproxy's guard against cross-site requests), 500 when the listen address is taken.
2. Built on ``http.server.BaseHTTPRequestHandler`` driven by gevent sockets in the same
   LoopThread as the proxies it controls, so a request and the proxies never race: each
   request runs to completion between two chunks the proxies forward.
3. A proxy created without ``listen`` listens on 127.0.0.1 on a free port (Toxiproxy would
   take every interface); the answer says which.
"""

from __future__ import annotations

import json
import logging
from http.server import BaseHTTPRequestHandler
from typing import Any

import gevent.socket as gsocket

from .._version import __version__
from ._loop import ListenerService, LoopThread
from ._proxy import FaultProxy, _join, parse_address
from ._toxics import Toxic, ToxicError

log = logging.getLogger("resilientsock")

VERSION = f"{__version__}-resilientsock"


class ToxiproxyAPI(ListenerService):
    """The HTTP API on ``host:port`` (Toxiproxy's default port is 8474; 0 picks a free one),
    controlling the FaultProxies in ``proxies`` (by name). Proxies it creates share its loop.
    Use as a context manager, or ``start()`` / ``shutdown()`` (which stops its proxies)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 8474,
                 loop: LoopThread | None = None, *, seed: int | str = 0,
                 connect_timeout: float = 5.0) -> None:
        super().__init__("toxiproxy-api", host, port, loop)
        self.seed = seed
        self.connect_timeout = connect_timeout
        self.proxies: dict[str, FaultProxy] = {}

    def create_proxy(self, name: str, listen: str, upstream: str,
                     enabled: bool = True) -> FaultProxy:
        """Create and (if ``enabled``) start a proxy, as ``POST /proxies`` does. Raises
        ToxicError (400 bad address, 409 name in use) or OSError (listen failed)."""
        return self._loop.call(self._create, name, listen, upstream, enabled)

    # -- inside the loop thread ---------------------------------------------------------------

    def _create(self, name: str, listen: str, upstream: str, enabled: bool) -> FaultProxy:
        if name in self.proxies:
            raise ToxicError("proxy already exists", 409)
        proxy = self._new_proxy(name, listen, upstream, enabled)
        self.proxies[name] = proxy
        return proxy

    def _new_proxy(self, name: str, listen: str, upstream: str, enabled: bool) -> FaultProxy:
        try:
            host, port = _resolve(parse_address(listen)) if listen else ("127.0.0.1", 0)
            up = parse_address(upstream)
        except ValueError as exc:
            raise ToxicError(f"bad request body: {exc}") from None
        proxy = FaultProxy(up, host, port, self._loop, seed=self.seed, name=name,
                           connect_timeout=self.connect_timeout)
        if enabled:
            proxy.start()
        else:
            proxy.enabled = False
        log.info("toxiproxy api: proxy %s on %s -> %s", name, _join(proxy.address), upstream)
        return proxy

    def _teardown(self) -> None:
        self._close_listener()
        for proxy in self.proxies.values():
            proxy.shutdown()
        self.proxies.clear()

    def _handle(self, client: Any) -> None:
        try:
            # Each response is one write (_Handler._reply); without Nagle's delay, a request
            # on a keep-alive connection is answered as fast as one on a new connection.
            client.setsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_NODELAY, 1)
            _Handler(client, client.getpeername(), self)  # type: ignore[arg-type]
        except OSError:
            pass
        finally:
            client.close()

    # -- the routes (inside the loop thread) ---------------------------------------------------

    def route(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        """One request -> (status, JSON value or None). ToxicError becomes its status."""
        parts = [p for p in path.split("?", 1)[0].split("/") if p]
        try:
            return self._route(method, parts, body)
        except ToxicError as exc:
            return exc.status, {"error": str(exc), "status": exc.status}
        except OSError as exc:
            return 500, {"error": str(exc), "status": 500}

    def _route(self, method: str, parts: list[str], body: Any) -> tuple[int, Any]:
        allowed: tuple[str, ...]
        if parts == ["version"]:
            allowed = ("GET",)
            if method == "GET":
                return 200, {"version": VERSION}
        elif parts == ["reset"]:
            allowed = ("POST",)
            if method == "POST":
                for proxy in self.proxies.values():
                    proxy.reset_state()
                return 204, None
        elif parts == ["populate"]:
            allowed = ("POST",)
            if method == "POST":
                return self._populate(body)
        elif parts == ["proxies"]:
            allowed = ("GET", "POST")
            if method == "GET":
                return 200, {n: p.to_json() for n, p in self.proxies.items()}
            if method == "POST":
                fields = _fields(body)
                return 201, self._create(fields["name"], fields["listen"], fields["upstream"],
                                         fields["enabled"]).to_json()
        elif len(parts) == 2 and parts[0] == "proxies":
            allowed = ("GET", "POST", "PATCH", "DELETE")
            proxy = self._proxy(parts[1])
            if method == "GET":
                return 200, proxy.to_json()
            if method in ("POST", "PATCH"):
                return 200, self._update(proxy, body).to_json()
            if method == "DELETE":
                proxy.shutdown()
                del self.proxies[parts[1]]
                return 204, None
        elif len(parts) == 3 and parts[0] == "proxies" and parts[2] == "toxics":
            allowed = ("GET", "POST")
            proxy = self._proxy(parts[1])
            if method == "GET":
                return 200, [t.to_json() for t in proxy.toxics()]
            if method == "POST":
                return 200, proxy._add_toxic(Toxic.from_json(_object(body))).to_json()
        elif len(parts) == 4 and parts[0] == "proxies" and parts[2] == "toxics":
            allowed = ("GET", "POST", "PATCH", "DELETE")
            proxy = self._proxy(parts[1])
            if method == "GET":
                return 200, proxy.toxic(parts[3]).to_json()
            if method in ("POST", "PATCH"):
                body = _object(body)
                attributes = body.get("attributes") or {}
                if not isinstance(attributes, dict):
                    raise ToxicError("bad request body: attributes must be an object")
                toxic = proxy._update_toxic(parts[3], body.get("toxicity"), attributes)
                return 200, toxic.to_json()
            if method == "DELETE":
                proxy.remove_toxic(parts[3])
                return 204, None
        else:
            return 404, {"error": "not found", "status": 404}
        return 405, {"error": f"method not allowed (allowed: {', '.join(allowed)})",
                     "status": 405}

    def _proxy(self, name: str) -> FaultProxy:
        if name not in self.proxies:
            raise ToxicError("proxy not found", 404)
        return self.proxies[name]

    def _update(self, proxy: FaultProxy, body: Any) -> FaultProxy:
        body = _object(body)
        listen = body.get("listen", _join(proxy.address))
        upstream = body.get("upstream", _join(proxy.upstream))
        enabled = body.get("enabled", proxy.enabled)
        if not isinstance(enabled, bool):
            raise ToxicError("bad request body: enabled must be true or false")
        try:
            new_listen = _resolve(parse_address(listen))
            new_up = parse_address(upstream)
        except (ValueError, TypeError) as exc:
            raise ToxicError(f"bad request body: {exc}") from None
        if new_listen != tuple(proxy.address) or new_up != tuple(proxy.upstream):
            # Toxiproxy stops the proxy (closing its connections) and starts it anew.
            was = proxy.enabled
            if was:
                proxy.disable()
            proxy._host, proxy._port = new_listen
            proxy.address = new_listen
            proxy.upstream = new_up
            if was:
                proxy.enable()
        if enabled != proxy.enabled:
            proxy.enable() if enabled else proxy.disable()
        return proxy

    def _populate(self, body: Any) -> tuple[int, Any]:
        if not isinstance(body, list):
            raise ToxicError("bad request body: a JSON array of proxies is expected")
        wanted = []
        for i, item in enumerate(body, 1):
            try:
                wanted.append(_fields(item))
            except ToxicError as exc:
                raise ToxicError(f"{exc} at proxy {i}", exc.status) from None
        done: list[FaultProxy] = []
        try:
            for fields in wanted:
                name = fields["name"]
                old = self.proxies.get(name)
                if old is not None:
                    # Toxiproxy keeps a proxy only when both addresses are the same; one given
                    # without `listen` is replaced (on a new free port).
                    same_up = _join(old.upstream) == fields["upstream"]
                    try:
                        same_listen = bool(fields["listen"]) and \
                            _resolve(parse_address(fields["listen"])) == tuple(old.address)
                    except ValueError as exc:
                        raise ToxicError(f"bad request body: {exc}") from None
                    if same_up and same_listen:
                        done.append(old)
                        continue
                    old.shutdown()
                    del self.proxies[name]
                self.proxies[name] = self._new_proxy(name, fields["listen"], fields["upstream"],
                                                     fields["enabled"])
                done.append(self.proxies[name])
        except (ToxicError, OSError) as exc:
            status = getattr(exc, "status", 500)
            return status, {"error": str(exc), "status": status,
                            "proxies": [p.to_json() for p in done]}
        return 201, {"proxies": [p.to_json() for p in done]}


def _resolve(address: tuple[str, int]) -> tuple[str, int]:
    """A listen address with its host name resolved to the IPv4 address the proxy binds (as
    Toxiproxy answers ``127.0.0.1:26379`` for ``localhost:26379``). Raises ValueError."""
    host, port = address
    try:
        infos = gsocket.getaddrinfo(host, port, gsocket.AF_INET, gsocket.SOCK_STREAM)
    except OSError as exc:
        raise ValueError(f"cannot resolve {host!r}: {exc}") from None
    return (infos[0][4][0], port)


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ToxicError("bad request body: a JSON object is expected")
    return body


def _fields(body: Any) -> dict[str, Any]:
    """A proxy's fields from a POST /proxies or /populate item (Toxiproxy's checks)."""
    body = _object(body)
    name, upstream = body.get("name") or "", body.get("upstream") or ""
    listen, enabled = body.get("listen") or "", body.get("enabled", True)
    if not isinstance(name, str) or not isinstance(upstream, str) or \
            not isinstance(listen, str) or not isinstance(enabled, bool):
        raise ToxicError("bad request body: name, listen and upstream are strings, "
                         "enabled is true or false")
    if not name:
        raise ToxicError("missing required field: name")
    if not upstream:
        raise ToxicError("missing required field: upstream")
    return {"name": name, "listen": listen, "upstream": upstream, "enabled": enabled}


class _Handler(BaseHTTPRequestHandler):
    """One HTTP/1.1 connection to the API (keep-alive), served in the API's loop."""

    protocol_version = "HTTP/1.1"
    server_version = f"resilientsock-toxiproxy/{__version__}"
    timeout = 60  # an idle keep-alive connection is closed after this (arbitrary)
    server: ToxiproxyAPI  # type: ignore[assignment]

    def _serve(self, method: str) -> None:
        if self.headers.get("User-Agent", "").startswith("Mozilla/"):
            self._reply(403, {"error": "User agent not allowed", "status": 403})
            return
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length > 0 else b""
        body: Any = None
        if raw.strip():
            try:
                body = json.loads(raw)
            except ValueError as exc:
                self._reply(400, {"error": f"bad request body: {exc}", "status": 400})
                return
        status, value = self.server.route(method, self.path, body)
        self._reply(status, value)

    def _reply(self, status: int, value: Any) -> None:
        """The status line, headers and body in one write (two writes on a connection
        without TCP_NODELAY cost a delayed-ACK stall, ~40 ms, per keep-alive request)."""
        data = b"" if value is None else json.dumps(value).encode() + b"\n"
        self.send_response(status)
        if value is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        # end_headers() would write the headers now, and the body in a second write.
        self._headers_buffer.append(b"\r\n" + (b"" if self.command == "HEAD" else data))
        self.flush_headers()

    def __getattr__(self, name: str) -> Any:
        # Any other method (PUT, OPTIONS, HEAD, ...): routed too, so a known path answers 405
        # and an unknown one 404, as Toxiproxy does (http.server would answer 501).
        if name.startswith("do_") and name[3:].isupper():
            return lambda: self._serve(name[3:])
        raise AttributeError(name)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._serve("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._serve("POST")

    def do_PATCH(self) -> None:  # noqa: N802
        self._serve("PATCH")

    def do_DELETE(self) -> None:  # noqa: N802
        self._serve("DELETE")

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("toxiproxy api: " + format, *args)
