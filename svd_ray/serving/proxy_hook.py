"""JSON for the HTTP errors that Ray Serve's proxy answers before the app sees the request.

Ray Serve's HTTP proxy runs uvicorn with ``http="auto"`` (httptools when installed, which Ray's
``uvicorn[standard]`` pulls in). A request uvicorn cannot parse — an unknown method such as ``FOO``, a
lowercase ``get``, a malformed request line or header — never reaches the application: uvicorn answers
``400 text/plain "Invalid HTTP request received."`` itself. Ray Serve 2.60 has no option for uvicorn's
protocol class or that response (``HTTPOptions`` has none; the proxy builds ``uvicorn.Config`` itself in
``ray/serve/_private/http_util.py:start_asgi_http_server``). Its one hook into the proxy process is the
environment variable ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``: a function the proxy calls once at
start-up, before it builds its server, to get ASGI middlewares (which only see requests that parsed).

``install`` is that callback. It registers, as uvicorn's ``"auto"`` HTTP protocol, a subclass of the one
uvicorn would pick whose ``send_400_response`` writes the service's error shape
``{"error": {"type": "invalid_http", "message", "field": null, "status": 400}}`` (``application/json``)
instead of plain text; parsing itself is unchanged (same parser, same performance). It also returns one
middleware, ``JsonProxyErrors``, which turns the proxy's own plain-text errors (503 while an application
is unavailable, its timeouts, 404 for a path no application serves) into the same shape. The protocol
part relies on uvicorn's ``config.HTTP_PROTOCOLS`` table and ``send_400_response`` method (uvicorn 0.55),
not on a Ray Serve option; ``tests/serving/test_fuzz.py`` checks it end to end through a real proxy, so an
upgrade that breaks it fails a test instead of silently going back to text.

``svd-ray serve`` sets the variable for the Ray it starts; on a cluster, export it in the environment of
``ray start`` on every node that runs a proxy::

    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=svd_ray.serving.proxy_hook:install
"""
from __future__ import annotations

import json

from uvicorn.protocols.http.h11_impl import H11Protocol

ENV_VAR = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
IMPORT_PATH = "svd_ray.serving.proxy_hook:install"


def error_body(msg: str) -> bytes:
    return json.dumps({"error": {
        "type": "invalid_http",
        "message": f"{msg.rstrip('.')}: not valid HTTP/1.1 (an unknown or lowercase method, or a malformed "
                   "request line or header)",
        "field": None, "status": 400}}, separators=(",", ":")).encode()


def _send_json_400(self, msg: str) -> None:
    body = error_body(msg)
    head = [b"HTTP/1.1 400 Bad Request\r\n"]
    for name, value in self.server_state.default_headers:  # date, server: as uvicorn sends them
        head += [name, b": ", value, b"\r\n"]
    head += [b"content-type: application/json\r\n", b"content-length: ", str(len(body)).encode(), b"\r\n",
             b"connection: close\r\n\r\n"]
    self.transport.write(b"".join(head) + body)
    self.transport.close()


class JsonErrorsH11Protocol(H11Protocol):
    send_400_response = _send_json_400


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # no httptools: uvicorn's "auto" is h11
    HttpToolsProtocol = None
    JsonErrorsHttpToolsProtocol = None
else:
    class JsonErrorsHttpToolsProtocol(HttpToolsProtocol):
        send_400_response = _send_json_400


_KINDS = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 408: "timeout",
          413: "payload_too_large", 429: "overloaded", 500: "internal_error", 502: "bad_gateway",
          503: "unavailable", 504: "timeout"}


class JsonProxyErrors:
    """ASGI middleware for the proxy: an error the proxy itself answers in plain text (503 while an
    application is unavailable or the proxy drains, 408/504 on its own timeouts, 429 on its back-pressure,
    404 for a path no application serves) becomes the service's JSON error; responses that already are JSON
    (every error of the app) and all successful ones pass through untouched."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http":
            return await self.app(scope, receive, send)
        held: dict = {}

        async def wrapped(message):
            kind = message.get("type")
            if kind == "http.response.start":
                headers = {k.lower(): v for k, v in message.get("headers", [])}
                ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
                if message.get("status", 200) >= 400 and ctype != b"application/json":
                    held["start"], held["body"] = message, b""
                    return
            elif kind == "http.response.body" and "start" in held:
                held["body"] += message.get("body", b"")
                if message.get("more_body", False):
                    return
                status = held["start"]["status"]
                text = held["body"].decode("utf-8", "replace").strip()[:500] or f"HTTP {status}"
                body = json.dumps({"error": {"type": _KINDS.get(status, "http_error"), "message": text,
                                             "field": None, "status": status}}, separators=(",", ":")).encode()
                keep = [(k, v) for k, v in held["start"].get("headers", [])
                        if k.lower() not in (b"content-type", b"content-length")]
                await send({**held["start"], "headers": keep + [(b"content-type", b"application/json"),
                                                                  (b"content-length", str(len(body)).encode())]})
                return await send({"type": "http.response.body", "body": body})
            await send(message)

        return await self.app(scope, receive, wrapped)


def install() -> list:
    """Ray Serve HTTP proxy callback: uvicorn's own 400 responses become JSON (its protocol classes), and so
    do the proxy's plain-text errors (the returned middleware)."""
    from starlette.middleware import Middleware
    from uvicorn import config

    config.HTTP_PROTOCOLS["h11"] = f"{__name__}:JsonErrorsH11Protocol"
    if JsonErrorsHttpToolsProtocol is not None:
        config.HTTP_PROTOCOLS["httptools"] = f"{__name__}:JsonErrorsHttpToolsProtocol"
    config.HTTP_PROTOCOLS["auto"] = config.HTTP_PROTOCOLS["httptools" if JsonErrorsHttpToolsProtocol else "h11"]
    return [Middleware(JsonProxyErrors)]
