"""The FastAPI ingress: authentication, rate limits, validation, routing to the model deployment.

Routes (JSON; every error is ``{"error": {"type", "message", "field", "status"}}``)::

    GET  /healthz                         liveness of this ingress replica (no key needed)
    GET  /metrics                         Prometheus text (public without keys; with keys: admin keys only)
    GET  /v1/tasks                        the tasks the caller may use, with version / method / μ̄
    GET  /v1/tasks/{task}                 one of them
    GET  /v1/models                       the same list, OpenAI-shaped
    POST /v1/tasks/{task}/generate        steered generation (optionally streamed as server-sent events)
    POST /v1/tasks/{task}/score           per-choice log-likelihoods, steered and unsteered
    POST /v1/completions                  OpenAI-compatible completions (model = task id), streaming too

Check order for a request: key (401) → rate limit (429) → body size (413) → JSON (400) → schema and
limits (422) → task visible to the tenant and present in the store (404, the same for both) → model.

The model side is reached through ``ModelBackend`` (``deployments.ServeBackend`` in the Serve app), so
this module imports neither Ray nor torch.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import AsyncIterator, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from svd_ray.serving.auth import Authenticator, AuthState, ClusterRateLimiter, RateLimiter, Tenant
from svd_ray.serving.metrics import Metrics, MetricsMiddleware
from svd_ray.serving.schemas import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    ScoreRequest,
    ServeSettings,
    check_generate_limits,
    check_openai_limits,
    check_score_limits,
    generation_payload,
    invalid,
    not_found_task,
    parse_json_body,
    parse_model,
)

log = logging.getLogger("svd_ray.serving.app")


class ModelBackend(Protocol):
    async def call(self, method: str, task: str, payload: dict) -> dict: ...

    def stream(self, task: str, payload: dict) -> AsyncIterator[dict]: ...


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _raise_model_error(out: dict) -> None:
    if not out.get("ok", False):
        raise ApiError.from_dict(out.get("error") or {})


def _sse(data: dict | str, event: str | None = None) -> bytes:
    body = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return ((f"event: {event}\n" if event else "") + f"data: {body}\n\n").encode()


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_FINISH_OPENAI = {"eos": "stop", "stop": "stop", "length": "length"}


class IngressService:
    """State of one ingress replica: settings, auth, rate limits, metrics, the store listing cache."""

    def __init__(self, settings: ServeSettings, auth: AuthState, backend: ModelBackend, store=None,
                 metrics: Metrics | None = None):
        self.settings = settings
        self.limits = settings.limits
        self.auth = Authenticator(auth)
        self.limiter = ClusterRateLimiter() if settings.auth.rate_limit_scope == "cluster" else RateLimiter()
        self.backend = backend
        self.metrics = metrics or Metrics()
        self._store = store
        self._listing: tuple[float, list[str]] = (float("-inf"), [])
        self._listing_lock = asyncio.Lock()
        self._info: dict[str, tuple[float, dict]] = {}

    # ------------------------------------------------------------------ store
    @property
    def store(self):
        if self._store is None:
            from svd_ray.store import open_store

            self._store = open_store(self.settings.store, cache_dir=self.settings.cache_dir)
        return self._store

    async def list_tasks(self, max_age: float | None = None) -> list[str]:
        ttl = self.settings.listing_ttl_s if max_age is None else max_age
        at, tasks = self._listing
        if time.monotonic() - at <= ttl:
            return tasks
        async with self._listing_lock:
            at, tasks = self._listing
            if time.monotonic() - at <= ttl:
                return tasks
            try:
                tasks = await asyncio.to_thread(self.store.list_tasks)
            except Exception as exc:
                log.error("listing the store failed: %s", exc)
                if at == float("-inf"):
                    raise ApiError(503, "unavailable", "the task store is unavailable", None,
                                   headers={"Retry-After": "5"}) from None
                return tasks  # serve the stale listing
            self._listing = (time.monotonic(), tasks)
            return tasks

    async def check_task(self, tenant: Tenant, task: str, field: str | None = None) -> None:
        """404 unless the tenant may use ``task`` and it exists (the same 404 in both cases)."""
        if not tenant.may_use(task):
            raise not_found_task(task, field)
        if task in await self.list_tasks():
            return
        if task in await self.list_tasks(max_age=0.5):  # just published? look again (at most twice a second)
            return
        raise not_found_task(task, field)

    async def task_info(self, task: str) -> dict:
        hit = self._info.get(task)
        if hit and time.monotonic() - hit[0] <= self.settings.listing_ttl_s:
            return hit[1]

        def read() -> dict:
            store = self.store
            promoted = store.promoted(task)
            version = promoted or store.resolve(task, "latest")
            m = store.manifest(task, version)
            return {
                "id": task, "object": "task", "version": version, "promoted": promoted is not None,
                "created_at": m.created_at, "base_model": m.base_model_id, "method": m.get("peft.method"),
                "mu": m.get("mu.value"), "mu_estimator": m.get("mu.estimator"), "alpha": m.get("alpha"),
                # how the task is served when a request names no steering mode, and why
                "steering_default": m.get("mu.default_mode") or "svdecode",
                "steering_reason": m.get("mu.validation.reason"),
            }

        try:
            info = await asyncio.to_thread(read)
        except Exception as exc:  # deleted meanwhile, corrupt manifest, store down: list it without details
            log.warning("reading the manifest of %s failed: %s", task, exc)
            info = {"id": task, "object": "task", "version": None}
        self._info[task] = (time.monotonic(), info)
        return info

    # ------------------------------------------------------------------ request steps
    async def begin(self, request: Request) -> Tenant:
        try:
            tenant = self.auth.authenticate(request.headers.get("authorization"))
        except ApiError:
            self.metrics.auth_failures.labels(self.metrics.replica).inc()
            raise
        try:
            if isinstance(self.limiter, ClusterRateLimiter):
                before = self.limiter.fallbacks
                try:
                    await self.limiter.check(tenant)
                finally:
                    if self.limiter.fallbacks > before:
                        self.metrics.rate_limit_fallbacks.labels(self.metrics.replica).inc()
            else:
                self.limiter.check(tenant)
        except ApiError:
            self.metrics.rate_limited.labels(tenant.name, self.metrics.replica).inc()
            self.metrics.tenant_requests.labels(tenant.name, "rate_limited", self.metrics.replica).inc()
            raise
        self.metrics.tenant_requests.labels(tenant.name, "accepted", self.metrics.replica).inc()
        return tenant

    async def read_json(self, request: Request) -> dict:
        # JSON only: a text/plain or form POST is what a web page can send cross-site without a preflight
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise ApiError(415, "unsupported_media_type",
                           f"send the body as application/json (got {ctype or 'no Content-Type'!r})",
                           "header.content-type")
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                raise ApiError(400, "invalid_request", "invalid Content-Length header", "header.content-length") from None
            if n > limit:
                raise ApiError(413, "payload_too_large", f"request body is {n} bytes; the limit is {limit}", "body")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, "payload_too_large", f"request body exceeds the limit of {limit} bytes", "body")
        return parse_json_body(bytes(body))

    async def call_model(self, method: str, task: str, payload: dict) -> dict:
        out = await self.backend.call(method, task, payload)
        _raise_model_error(out)
        return out

    async def open_stream(self, task: str, payload: dict) -> tuple[dict, AsyncIterator[dict]]:
        """Start a stream and wait for its first event, so that errors before any output are real HTTP errors."""
        it = self.backend.stream(task, payload).__aiter__()
        try:
            first = await asyncio.wait_for(it.__anext__(), self.settings.request_timeout_s)
        except StopAsyncIteration:
            raise ApiError(502, "bad_gateway", "the model deployment ended the stream without output") from None
        except asyncio.TimeoutError:
            await _aclose(it)
            raise ApiError(504, "timeout", f"no response within {self.settings.request_timeout_s:g} s") from None
        if first.get("event") == "error":
            await _aclose(it)
            raise ApiError.from_dict(first.get("error") or {})
        return first, it

    async def events(self, it: AsyncIterator[dict]) -> AsyncIterator[dict]:
        """The rest of a stream; a failure mid-way becomes a final ``error`` event (never a hang)."""
        deadline = time.monotonic() + self.settings.request_timeout_s
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    yield {"event": "error", "error": ApiError(504, "timeout", "stream exceeded the request timeout").body()["error"]}
                    return
                try:
                    ev = await asyncio.wait_for(it.__anext__(), left)
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:
                    yield {"event": "error", "error": ApiError(504, "timeout", "stream exceeded the request timeout").body()["error"]}
                    return
                except ApiError as exc:
                    yield {"event": "error", "error": exc.body()["error"]}
                    return
                except Exception:
                    log.exception("stream failed")
                    self.metrics.model_errors.labels("stream", self.metrics.replica).inc()
                    yield {"event": "error", "error": ApiError(503, "unavailable", "the model replica failed during the stream").body()["error"]}
                    return
                yield ev
                if ev.get("event") == "error":
                    return
        finally:
            await _aclose(it)


async def _aclose(it) -> None:
    close = getattr(it, "aclose", None)
    cancel = getattr(it, "cancel", None)
    try:
        if close is not None:
            await close()
        elif cancel is not None:
            cancel()
    except Exception:
        pass


# ------------------------------------------------------------------------------------------- app
def create_app(svc: IngressService) -> FastAPI:
    # redirect_slashes=False: '/v1/tasks/' is a JSON 404, never a redirect whose Location echoes the Host header
    app = FastAPI(title="svd-ray", version="1", docs_url="/docs", redoc_url=None, redirect_slashes=False)
    app.add_middleware(MetricsMiddleware, metrics=svc.metrics)
    app.state.svc = svc
    limits = svc.limits
    app.openapi = lambda: _openapi(app)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        msg = {404: f"no route {request.url.path}", 405: f"method {request.method} is not allowed on {request.url.path}"}
        return error_response(ApiError(exc.status_code, kind, msg.get(exc.status_code, str(exc.detail)), None,
                                       headers=dict(exc.headers or {})))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        loc = ".".join(str(x) for x in (errs[0].get("loc") or ("request",))) if errs else "request"
        return error_response(ApiError(422, "invalid_request", f"{loc}: {errs[0].get('msg') if errs else 'invalid'}", loc))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        ref = uuid.uuid4().hex[:12]
        log.exception("unexpected error (ref %s) on %s %s", ref, request.method, request.url.path)
        return error_response(ApiError(500, "internal_error", f"internal error (reference {ref})"))

    # ------------------------------------------------------------------ public
    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics(request: Request):
        body, ctype = svc.metrics.render()
        public = svc.settings.metrics_public
        if svc.auth.disabled:
            return Response(body, media_type=ctype)
        if public is None or not public or request.headers.get("authorization"):
            tenant = svc.auth.authenticate(request.headers.get("authorization"))
            if tenant.admin:
                return Response(body, media_type=ctype)
            if not public:
                raise ApiError(403, "forbidden", "reading /metrics needs an admin key (tenants file: admin: true)",
                               "header.authorization")
        return Response(_without_tenant_labels(body), media_type=ctype)

    # ------------------------------------------------------------------ listing
    async def _visible(tenant: Tenant) -> list[str]:
        return [t for t in await svc.list_tasks() if tenant.may_use(t)]

    @app.get("/v1/tasks")
    async def list_tasks(request: Request):
        tenant = await svc.begin(request)
        tasks = await _visible(tenant)
        infos = await asyncio.gather(*(svc.task_info(t) for t in tasks))
        return {"object": "list", "data": list(infos)}

    @app.get("/v1/tasks/{task}")
    async def get_task(task: str, request: Request):
        tenant = await svc.begin(request)
        await svc.check_task(tenant, task)
        return await svc.task_info(task)

    @app.get("/v1/models")
    async def list_models(request: Request):
        tenant = await svc.begin(request)
        tasks = await _visible(tenant)
        infos = await asyncio.gather(*(svc.task_info(t) for t in tasks))
        return {"object": "list", "data": [_model_entry(t, i) for t, i in zip(tasks, infos)]}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str, request: Request):
        tenant = await svc.begin(request)
        await svc.check_task(tenant, model_id)
        return _model_entry(model_id, await svc.task_info(model_id))

    # ------------------------------------------------------------------ generate
    @app.post("/v1/tasks/{task}/generate")
    async def generate(task: str, request: Request):
        tenant = await svc.begin(request)
        req = parse_model(GenerateRequest, await svc.read_json(request))
        check_generate_limits(req.prompt, req.max_new_tokens, req.num_beams, req.stop, limits,
                              temperature=req.temperature, stream=req.stream)
        await svc.check_task(tenant, task)
        payload = generation_payload(task, req.prompt, max_new_tokens=req.max_new_tokens, temperature=req.temperature,
                                     top_p=req.top_p, top_k=req.top_k, num_beams=req.num_beams,
                                     length_penalty=req.length_penalty, seed=req.seed, stop=req.stop,
                                     steering=req.steering_dict(), tenant=tenant.name,
                                     min_new_tokens=req.min_new_tokens)
        if req.stream:
            first, it = await svc.open_stream(task, payload)
            return StreamingResponse(_native_sse(svc, task, first, it), media_type="text/event-stream",
                                     headers=_SSE_HEADERS)
        out = await svc.call_model("generate", task, payload)
        svc.metrics.usage(task, out["steering"]["mode"], out["usage"]["prompt_tokens"], out["usage"]["completion_tokens"])
        return {
            "object": "generation", "task": task, "version": out["version"], "method": out["method"],
            "steering": out["steering"],
            "choices": [{"index": i, **r} for i, r in enumerate(out["results"])],
            "usage": {**out["usage"], "total_tokens": out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"]},
        }

    # ------------------------------------------------------------------ score
    @app.post("/v1/tasks/{task}/score")
    async def score(task: str, request: Request):
        tenant = await svc.begin(request)
        req = parse_model(ScoreRequest, await svc.read_json(request))
        check_score_limits(req, limits)
        await svc.check_task(tenant, task)
        payload = {"task": task, "prompt": req.prompt, "choices": req.choices, "outside_mask": req.outside_mask,
                   "steering": req.steering_dict(), "tenant": tenant.name}
        out = await svc.call_model("score", task, payload)
        out.pop("ok", None)
        return {"object": "scores", **out}

    # ------------------------------------------------------------------ completions
    @app.post("/v1/completions")
    async def completions(request: Request):
        tenant = await svc.begin(request)
        req = parse_model(CompletionRequest, await svc.read_json(request))
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        check_generate_limits([] if req.token_ids else req.prompt, max_tokens, 1, req.stop, limits,
                              tokens_field="body.max_tokens")
        if req.token_ids and len(req.prompt) > limits.max_prompts:
            raise invalid("body.prompt", f"at most {limits.max_prompts} prompts per request")
        check_openai_limits(req, limits, len(req.prompt))
        task = req.model
        await svc.check_task(tenant, task, field="body.model")
        payload = generation_payload(task, req.prompt, max_new_tokens=max_tokens, temperature=req.temperature,
                                     top_p=req.top_p, top_k=req.top_k, seed=req.seed, stop=req.stop,
                                     steering=req.steering_dict(), tenant=tenant.name, n=req.n,
                                     logprobs=req.logprobs, echo=req.echo, outside_mask=req.outside_mask)
        cid = "cmpl-" + uuid.uuid4().hex[:24]
        created = int(time.time())
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            first, it = await svc.open_stream(task, payload)
            return StreamingResponse(_openai_sse(svc, task, cid, created, first, it, include_usage),
                                     media_type="text/event-stream", headers=_SSE_HEADERS)
        out = await svc.call_model("generate", task, payload)
        usage = out["usage"]
        svc.metrics.usage(task, out["steering"]["mode"], usage["prompt_tokens"], usage["completion_tokens"])
        return {
            "id": cid, "object": "text_completion", "created": created, "model": task,
            "system_fingerprint": out["version"],
            "choices": [{"text": r.get("prompt_text", "") + r["text"], "index": i, "logprobs": r.get("logprobs"),
                         "finish_reason": _FINISH_OPENAI[r["finish_reason"]]}
                        for i, r in enumerate(out["results"])],
            "usage": {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]},
        }

    # ------------------------------------------------------------------ chat completions
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        tenant = await svc.begin(request)
        req = parse_model(ChatCompletionRequest, await svc.read_json(request))
        max_tokens = req.new_tokens()
        field = "body.max_completion_tokens" if req.max_completion_tokens else "body.max_tokens"
        check_generate_limits([], max_tokens, 1, req.stop, limits, tokens_field=field)
        check_openai_limits(req, limits, 1)
        if req.chars() > limits.max_prompt_chars:
            raise invalid("body.messages", f"messages total {req.chars()} characters; the limit is "
                                           f"{limits.max_prompt_chars}")
        task = req.model
        await svc.check_task(tenant, task, field="body.model")
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        payload = generation_payload(task, [], max_new_tokens=max_tokens, temperature=req.temperature,
                                     top_p=req.top_p, top_k=req.top_k, seed=req.seed, stop=req.stop,
                                     steering=req.steering_dict(), tenant=tenant.name, messages=messages, n=req.n)
        cid = "chatcmpl-" + uuid.uuid4().hex[:24]
        created = int(time.time())
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            first, it = await svc.open_stream(task, payload)
            return StreamingResponse(_openai_sse(svc, task, cid, created, first, it, include_usage, chat=True, n=req.n),
                                     media_type="text/event-stream", headers=_SSE_HEADERS)
        out = await svc.call_model("generate", task, payload)
        usage = out["usage"]
        svc.metrics.usage(task, out["steering"]["mode"], usage["prompt_tokens"], usage["completion_tokens"])
        return {
            "id": cid, "object": "chat.completion", "created": created, "model": task,
            "system_fingerprint": out["version"],
            "choices": [{"index": i, "message": {"role": "assistant", "content": r["text"]}, "logprobs": None,
                         "finish_reason": _FINISH_OPENAI[r["finish_reason"]]} for i, r in enumerate(out["results"])],
            "usage": {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]},
        }

    return app


# request bodies are parsed by hand (for the error format), so FastAPI cannot see their models: /openapi.json
# gets them from here, and every error response is documented as the one error shape
_BODY_MODELS = {
    "/v1/tasks/{task}/generate": GenerateRequest,
    "/v1/tasks/{task}/score": ScoreRequest,
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatCompletionRequest,
}
_ERROR_SCHEMA = {
    "type": "object", "required": ["error"], "additionalProperties": False,
    "properties": {"error": {
        "type": "object", "required": ["type", "message", "field", "status"],
        "properties": {"type": {"type": "string"}, "message": {"type": "string"},
                       "field": {"type": ["string", "null"]}, "status": {"type": "integer"},
                       "errors": {"type": "array", "items": {"type": "object", "properties": {
                           "field": {"type": "string"}, "message": {"type": "string"}}}}},
    }},
}


def _openapi(app: FastAPI) -> dict:
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422 shape: not ours
        comps.pop(name, None)
    comps["Error"] = _ERROR_SCHEMA
    error = {"description": "error (see docs/SERVING.md §2)",
             "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    for path, ops in schema.get("paths", {}).items():
        for method, op in ops.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            responses["4XX"] = error
            model = _BODY_MODELS.get(path) if method == "post" else None
            if model is not None:
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                comps.update(body.pop("$defs", {}))
                comps[model.__name__] = body
                op["requestBody"] = {"required": True, "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
    app.openapi_schema = schema
    return schema


def _without_tenant_labels(body: bytes) -> bytes:
    """Prometheus text minus the samples labelled by tenant or task (public metrics with keys configured)."""
    keep = [line for line in body.split(b"\n") if not (b'tenant="' in line or b'task="' in line)]
    return b"\n".join(keep)


def _model_entry(task: str, info: dict) -> dict:
    """An OpenAI model object for a task; ``created`` = when its served version was published (unix s)."""
    created = 0
    stamp = (info or {}).get("created_at")
    if isinstance(stamp, str):
        try:
            from datetime import datetime

            created = int(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp())
        except ValueError:
            created = 0
    return {"id": task, "object": "model", "created": created, "owned_by": "svd-ray"}


async def _native_sse(svc: IngressService, task: str, first: dict, it) -> AsyncIterator[bytes]:
    """``event: meta|token|end|usage|error`` then ``event: done``."""
    yield _sse({k: v for k, v in first.items() if k != "event"}, first.get("event", "meta"))
    mode = (first.get("steering") or {}).get("mode", "?")
    async for ev in svc.events(it):
        name = ev.get("event", "message")
        if name == "usage":
            svc.metrics.usage(task, mode, ev.get("prompt_tokens", 0), ev.get("completion_tokens", 0))
            ev = {**ev, "total_tokens": ev.get("prompt_tokens", 0) + ev.get("completion_tokens", 0)}
        yield _sse({k: v for k, v in ev.items() if k != "event"}, name)
        if name == "error":
            return
    yield _sse({}, "done")


async def _openai_sse(svc: IngressService, task: str, cid: str, created: int, first: dict, it,
                      include_usage: bool, chat: bool = False, n: int = 1) -> AsyncIterator[bytes]:
    """OpenAI stream events (``data: {...}``) ending with ``data: [DONE]``: ``text_completion`` chunks, or
    with ``chat`` ``chat.completion.chunk`` deltas (a role delta first); a failure mid-way is
    ``data: {"error": ...}``."""
    version = first.get("version")
    mode = (first.get("steering") or {}).get("mode", "?")

    def chunk(choices: list, usage: dict | None = None) -> bytes:
        body = {"id": cid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                "model": task, "system_fingerprint": version, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return _sse(body)

    def choice(index: int, text: str | None, finish: str | None) -> dict:
        if chat:
            delta = {} if text is None else {"content": text}
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"text": text or "", "index": index, "logprobs": None, "finish_reason": finish}

    if chat:
        for i in range(n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
    async for ev in svc.events(it):
        name = ev.get("event")
        if name == "token":
            yield chunk([choice(ev["index"], ev["text"], None)])
        elif name == "end":
            yield chunk([choice(ev["index"], None, _FINISH_OPENAI.get(ev["finish_reason"], "stop"))])
        elif name == "usage":
            svc.metrics.usage(task, mode, ev.get("prompt_tokens", 0), ev.get("completion_tokens", 0))
            if include_usage:
                yield chunk([], {"prompt_tokens": ev["prompt_tokens"], "completion_tokens": ev["completion_tokens"],
                                 "total_tokens": ev["prompt_tokens"] + ev["completion_tokens"]})
        elif name == "error":
            yield _sse({"error": ev.get("error")})
            return
    yield _sse("[DONE]")
