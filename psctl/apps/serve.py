"""``psctl serve``: prediction over HTTP with aiohttp, in TensorFlow Serving's REST shape.

aiohttp is asyncio-native, so it runs on psctl's own event loop (uvloop where
installed) next to the parameter-server client a live model source needs. What
is answered lives in :mod:`psctl.apps.serving`; this module only moves bytes
and holds the limits:

- a body is at most ``max_body_bytes`` (413) and must arrive within
  ``request_timeout_s`` (408); the rest of a body refused before it was read is
  drained for at most as long, then the connection is closed; a request holds at
  most ``max_rows`` instances;
- a connection may be idle (no complete request: a silent client, or headers
  sent a byte at a time) for ``idle_timeout_s``, then it is closed;
- at most ``max_connections`` connections are held; one more is told 503 in one
  sentence and closed;
- large bodies are read ``MAX_LARGE_READS`` at a time, so what slow uploads hold
  is bounded (``MAX_LARGE_READS * max_body_bytes``) however many connect.

Every refusal is a 4xx with ``{"error": "one sentence"}``, and the server goes on.
Beyond loopback it needs a bearer token (compared in constant time) or
``insecure``; TLS with ``--tls-cert`` and ``--tls-key``.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from psctl import net
from psctl.apps import serving
from psctl.apps.kept import DEFAULT_REFRESH_S, MIN_REFRESH_S, LiveSource
from psctl.apps.runtime import on_signal
from psctl.errors import PsctlError, SecurityError, UsageError

log = logging.getLogger("psctl.serve")

TOKEN_ENV = "PSCTL_SERVE_TOKEN"
DEFAULT_PORT = 8501  # TensorFlow Serving's REST port
DEFAULT_MAX_ROWS = 10_000
DEFAULT_MAX_BODY_BYTES = 4 << 20
DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_IDLE_TIMEOUT_S = 15.0
DEFAULT_REQUEST_TIMEOUT_S = 10.0
#: Bodies up to this size are read at once (the transport has buffered them already).
SMALL_BODY_BYTES = 256 << 10
#: Larger bodies are read this many at a time.
MAX_LARGE_READS = 8
SHUTDOWN_TIMEOUT_S = 5.0
OPEN_PATHS = ("/v1/health",)  # answered without a token (probes)
PSCTL_SERVE_EXTRA = "pip install 'psctl[serve]'"


@dataclass(frozen=True)
class ServeConfig:
    models: list[tuple[str, str]]  # (name, model file), or with ``server`` (served name, kept model name)
    server: str | None = None  # HOST:PORT of a psctl server whose kept models are served
    refresh_s: float = DEFAULT_REFRESH_S  # with ``server``: seconds between reads of the weights
    server_security: net.Security = net.LOCAL  # how to reach ``server`` (its secret, its TLS CA)
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    token_file: str | None = None
    insecure: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    model_class: str | None = None
    max_rows: int = DEFAULT_MAX_ROWS
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S

    def check(self) -> None:
        for name in ("max_rows", "max_body_bytes", "max_connections"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("idle_timeout_s", "request_timeout_s"):
            if not getattr(self, name) > 0:
                raise UsageError(f"--{name.replace('_', '-')} must be positive")
        if not 0 <= self.port <= 65535:
            raise UsageError(f"--port must be from 0 to 65535; got {self.port}")
        if self.server is not None and not self.refresh_s >= MIN_REFRESH_S:
            raise UsageError(f"--refresh-s must be at least {MIN_REFRESH_S:g}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise UsageError("serving with TLS needs both --tls-cert and --tls-key")


def _aiohttp() -> Any:
    try:
        from aiohttp import web
    except ImportError:
        raise UsageError(f"psctl serve needs aiohttp, which is not installed; run: {PSCTL_SERVE_EXTRA}") from None
    return web


def load_token(token_file: str | None) -> bytes | None:
    """The bearer token from ``token_file`` (mode 600, as a secret file) or ${PSCTL_SERVE_TOKEN}."""
    if token_file is None:
        value = os.environ.get(TOKEN_ENV)
        return None if value is None else net.load_secret(None, {"PSCTL_SECRET": value})
    return net.load_secret(token_file, {})


def check_bind(host: str, token: bytes | None, insecure: bool) -> None:
    """Refuse to answer beyond this host without a token, unless told ``insecure``."""
    if token is None and not insecure and not net.is_loopback(host):
        raise SecurityError(
            f"refusing to serve on '{host or '*'}' without a token, because anyone who can reach the port could "
            f"use the models; give --token-file (or ${TOKEN_ENV}), or pass --insecure on a network you trust"
        )


class _QuietBadHttp(logging.Filter):
    """aiohttp answers a malformed HTTP message (a NUL in a header, a bad request line) with a 400
    and logs it with a traceback; a client must not be able to fill the log that way."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        return not (record.exc_info and isinstance(record.exc_info[1], HttpProcessingError))


def error_body(sentence: str) -> bytes:
    return json.dumps({"error": sentence}).encode()


# -- the application --------------------------------------------------------------
class Service:
    """The HTTP routes over a set of model sources, with the limits of a :class:`ServeConfig`."""

    def __init__(self, cfg: ServeConfig, sources: dict[str, serving.ModelSource], token: bytes | None, scheme: str):
        self.cfg, self.sources, self.token, self.scheme = cfg, sources, token, scheme
        self.large_reads = asyncio.Semaphore(MAX_LARGE_READS)
        self.web = _aiohttp()

    def app(self) -> Any:
        web = self.web
        errors = web.middleware(lambda request, handler: self._errors(request, handler))
        auth = web.middleware(lambda request, handler: self._auth(request, handler))
        app = web.Application(client_max_size=self.cfg.max_body_bytes, middlewares=[errors, auth])
        app.router.add_get("/v1/health", self.health)
        app.router.add_get("/v1/models", self.list_models)
        # One resource per path, so a 405's Allow header lists exactly that path's methods.
        app.router.add_get("/v1/models/{name:[^/:]+}", self.get_model)
        app.router.add_post("/v1/models/{name:[^/:]+}:predict", self.predict)
        app.router.add_post("/v1/models/{name:[^/:]+}:recommend", self.recommend)
        app.router.add_get("/openapi.json", self.openapi)
        return app

    def _json(self, body: Any, status: int = 200) -> Any:
        return self.web.Response(body=json.dumps(body, allow_nan=False).encode(), status=status, content_type="application/json")

    def _error(self, status: int, sentence: str, headers: dict[str, str] | None = None) -> Any:
        return self.web.Response(body=error_body(sentence), status=status, content_type="application/json", headers=headers)

    # aiohttp's middlewares: (request, handler) -> response; app() marks them as such.
    async def _errors(self, request: Any, handler: Callable[[Any], Any]) -> Any:
        web = self.web
        try:
            return await handler(request)
        except serving.BadRequest as exc:
            return self._error(exc.status, str(exc))
        except web.HTTPNotFound:
            return self._error(404, f"there is no {request.path[:80]!r} here; see GET /openapi.json for the paths")
        except web.HTTPMethodNotAllowed as exc:
            allowed = ", ".join(sorted(exc.allowed_methods))
            return self._error(405, f"{request.method[:10]} is not allowed on {request.path[:80]!r}; use {allowed}", {"Allow": allowed})
        except web.HTTPRequestEntityTooLarge:
            return self._error(413, f"the body is over the limit of {self.cfg.max_body_bytes} bytes (--max-body-bytes)")
        except web.HTTPException as exc:
            return self._error(exc.status if exc.status >= 400 else 400, exc.reason or "the request was refused")
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception:
            log.exception("request %s %s failed", request.method, request.path)
            return self._error(500, "the server failed on this request (a bug: its log has the traceback)")

    async def _auth(self, request: Any, handler: Callable[[Any], Any]) -> Any:
        if self.token is not None and request.path not in OPEN_PATHS:
            given = request.headers.get("Authorization", "")
            scheme, _, value = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), self.token):
                what = "no bearer token" if not given else "a wrong token"
                return self._error(401, f"this server needs 'Authorization: Bearer TOKEN' and the request has {what}",
                                   {"WWW-Authenticate": 'Bearer realm="psctl"'})  # fmt: skip
        return await handler(request)

    # -- routes
    async def health(self, request: Any) -> Any:
        """200 while every model's weights are current; 503 (and which) while a live model
        cannot refresh them (it still answers with its last weights): a readiness probe's cue."""
        stale = sorted(name for name, source in self.sources.items() if source.stale)
        if stale:
            return self._json({"status": "stale", "models": len(self.sources), "stale": stale}, 503)
        return self._json({"status": "ok", "models": len(self.sources)})

    async def list_models(self, request: Any) -> Any:
        return self._json({"models": [await self._metadata(name) for name in self.sources]})

    async def _metadata(self, name: str) -> dict[str, Any]:
        source = self.sources[name]
        return serving.metadata(name, source, await source.snapshot())

    def _source(self, name: str) -> serving.ModelSource:
        source = self.sources.get(name)
        if source is None:
            served = ", ".join(sorted(self.sources)[:10])
            raise serving.BadRequest(f"no model is named '{name[:60]}' here (served: {served})", 404)
        return source

    async def get_model(self, request: Any) -> Any:
        name = request.match_info["name"]
        self._source(name)
        return self._json(await self._metadata(name))

    async def predict(self, request: Any) -> Any:
        source = self._source(request.match_info["name"])
        body = serving.parse_body(await self._read(request))
        return self._json({"predictions": serving.predictions(await source.snapshot(), body, self.cfg.max_rows)})

    async def recommend(self, request: Any) -> Any:
        source = self._source(request.match_info["name"])
        body = serving.parse_body(await self._read(request))
        return self._json(serving.recommendations(await source.snapshot(), body))

    async def _read(self, request: Any) -> bytes:
        """The body, within the size limit (aiohttp counts it) and the time limit."""
        length = request.content_length
        if length is not None and length > self.cfg.max_body_bytes:
            raise self.web.HTTPRequestEntityTooLarge(max_size=self.cfg.max_body_bytes, actual_size=length)
        try:
            if length is not None and length <= SMALL_BODY_BYTES:
                async with asyncio.timeout(self.cfg.request_timeout_s):
                    return await request.read()
            async with self.large_reads, asyncio.timeout(self.cfg.request_timeout_s):
                return await request.read()
        except TimeoutError:
            raise serving.BadRequest(f"the body did not arrive within {self.cfg.request_timeout_s:g} s (--request-timeout-s)", 408) from None

    async def openapi(self, request: Any) -> Any:
        snaps = {name: await source.snapshot() for name, source in self.sources.items()}
        return self._json(serving.openapi(snaps, self.token is not None, self.cfg.max_rows))


class _Refuse(asyncio.Protocol):
    """A connection over ``max_connections``: one 503 sentence, then closed."""

    def __init__(self, limit: int):
        body = error_body(f"the server holds its limit of {limit} connections (--max-connections); try again shortly")
        self.response = (
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Retry-After: 1\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )

    def connection_made(self, transport: Any) -> None:
        transport.write(self.response)
        transport.close()


# -- running it ---------------------------------------------------------------------
def _notice(text: str) -> None:
    """A line for the operator on stderr, whatever PSCTL_LOG says (a model's weights going stale)."""
    print(f"psctl serve: {text}", file=sys.stderr, flush=True)


def load_sources(cfg: ServeConfig) -> dict[str, serving.ModelSource]:
    """The model sources ``cfg`` names: model files, or with ``cfg.server`` kept models (read at start())."""
    if cfg.server is not None:
        return {
            name: LiveSource(name, kept, cfg.server, refresh_s=cfg.refresh_s, model_class_path=cfg.model_class,
                             security=cfg.server_security, notice=_notice)
            for name, kept in cfg.models
        }  # fmt: skip
    return {name: serving.FileSource.load(name, path, cfg.model_class) for name, path in cfg.models}


async def run(cfg: ServeConfig, on_line: Callable[[str], None]) -> None:
    """Serve ``cfg.models`` until SIGINT or SIGTERM; the first line says where."""
    cfg.check()
    web = _aiohttp()
    token = load_token(cfg.token_file)
    check_bind(cfg.host, token, cfg.insecure)
    ssl_ctx = net.TlsConfig(cfg.tls_cert, cfg.tls_key).server_context if cfg.tls_cert else None
    sources = load_sources(cfg)
    logging.getLogger("aiohttp.server").addFilter(_QuietBadHttp())
    try:
        for source in sources.values():
            await source.start()
        await _serve(cfg, web, sources, token, ssl_ctx, on_line)
    finally:
        for source in sources.values():
            await source.close()
    on_line("psctl serve stopped")


async def _serve(cfg: ServeConfig, web: Any, sources: dict[str, serving.ModelSource], token: bytes | None, ssl_ctx: Any,
                 on_line: Callable[[str], None]) -> None:  # fmt: skip
    """Listen, announce, answer until a signal, then stop in steps (accepting, requests in progress)."""
    service = Service(cfg, sources, token, "https" if ssl_ctx else "http")
    # lingering_time: after an answer given before the body was read (413, 408), aiohttp reads and
    # drops the rest of the body for up to 10 s before closing; a slow client would hold the
    # connection that long past its 408. The rest of a body gets the time a body gets.
    runner = web.AppRunner(service.app(), access_log=None, keepalive_timeout=cfg.idle_timeout_s, handle_signals=False,
                           lingering_time=cfg.request_timeout_s)
    await runner.setup()
    handlers = runner.server

    def connection() -> asyncio.Protocol:
        if len(handlers.connections) >= cfg.max_connections:
            return _Refuse(cfg.max_connections)
        return handlers()

    loop = asyncio.get_running_loop()
    try:
        try:
            server = await loop.create_server(connection, cfg.host, cfg.port, ssl=ssl_ctx, backlog=1024, reuse_address=True)
        except OSError as exc:
            why = "the port is in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            raise PsctlError(f"cannot listen on {cfg.host}:{cfg.port}: {why}") from None
        stop = on_signal()
        host, port = server.sockets[0].getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        on_line(f"psctl serve listening on {service.scheme}://{shown}:{port} (models: {', '.join(sources)})")
        for name, source in sources.items():
            snap = await source.snapshot()
            where = source.describe()
            origin = where.get("path") or f"kept model {where['model']} on {where['address']}, read every {where['refresh_s']:g} s"
            on_line(f"  {name}: {snap.meta.get('kind')} model ({snap.model.task}, {len(snap.columns)} columns) from {origin}")
        await stop.wait()
        server.close()  # stop accepting; then let requests in progress finish, within a bound
        await handlers.shutdown(SHUTDOWN_TIMEOUT_S)
        await server.wait_closed()
    finally:
        await runner.cleanup()
