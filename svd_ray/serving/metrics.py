"""Prometheus metrics of one ingress replica (``GET /metrics``) and an ASGI middleware that records them.

Each ingress replica has its own registry; a scrape through the Serve proxy reaches one replica, so
label ``replica`` tells them apart (scrape every replica, or use Ray's metrics export, which also carries
the model replicas' pool gauges — ``svd_ray_pool_*`` — see docs/SERVING.md).
"""
from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

try:  # no *_created series: they double the output and carry no information here
    from prometheus_client import disable_created_metrics

    disable_created_metrics()
except ImportError:  # pragma: no cover
    pass

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self, replica: str = "local"):
        self.registry = CollectorRegistry(auto_describe=True)
        self.replica = replica
        r = self.registry
        self.requests = Counter("svd_ray_http_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status", "replica"], registry=r)
        self.latency = Histogram("svd_ray_http_request_seconds", "Time to response headers, by route",
                                 ["route", "replica"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("svd_ray_http_in_flight", "Requests being handled", ["replica"], registry=r)
        self.tenant_requests = Counter("svd_ray_tenant_requests", "Authenticated requests by tenant and outcome",
                                       ["tenant", "outcome", "replica"], registry=r)
        self.auth_failures = Counter("svd_ray_auth_failures", "Requests rejected with 401", ["replica"], registry=r)
        self.rate_limited = Counter("svd_ray_rate_limited", "Requests rejected with 429", ["tenant", "replica"],
                                    registry=r)
        self.rate_limit_fallbacks = Counter("svd_ray_rate_limit_fallback",
                                            "Rate-limit decisions taken by this replica's own buckets because the "
                                            "cluster ledger was unreachable", ["replica"], registry=r)
        self.generated_tokens = Counter("svd_ray_generated_tokens", "Tokens generated", ["task", "steering", "replica"],
                                        registry=r)
        self.prompt_tokens = Counter("svd_ray_prompt_tokens", "Prompt tokens processed", ["task", "replica"],
                                     registry=r)
        self.model_errors = Counter("svd_ray_model_errors", "Model deployment failures seen by the ingress",
                                    ["kind", "replica"], registry=r)
        self.retries = Counter("svd_ray_model_retries", "Requests retried after a model replica failure",
                               ["replica"], registry=r)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def usage(self, task: str, steering: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens.labels(task, self.replica).inc(prompt_tokens)
        self.generated_tokens.labels(task, steering, self.replica).inc(completion_tokens)


class MetricsMiddleware:
    """Pure ASGI: counts requests by route template (not raw path) and status; latency to headers."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        m = self.metrics
        start = time.perf_counter()
        status = {"code": 500, "seen": False}

        async def send_wrapper(message):
            if message["type"] == "http.response.start" and not status["seen"]:
                status["code"], status["seen"] = message["status"], True
                m.latency.labels(_route(scope), m.replica).observe(time.perf_counter() - start)
            await send(message)

        m.in_flight.labels(m.replica).inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            m.in_flight.labels(m.replica).dec()
            m.requests.labels(_route(scope), scope.get("method", "?"), str(status["code"]), m.replica).inc()


def _route(scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "other"
