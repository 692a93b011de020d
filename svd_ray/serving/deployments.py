"""Ray Serve deployments and the application builder.

    Ingress (FastAPI, svd_ray.serving.app)  --handle, multiplexed_model_id=task-->  TaskModels
    ``serve run serve_configs/local.yaml`` / ``svd-ray serve`` / ``serve deploy`` all import
    ``svd_ray.serving.deployments:build_app`` with the config's ``args`` (see ``ServeSettings``).

TaskModels (one replica = one process holding a ``ModelPool``):
  * ``@serve.multiplexed`` keyed by task id: Serve routes a task's requests to replicas that already
    hold it; the pool (count + bytes LRU, pins, version refresh) decides what really stays loaded and
    tells Serve when it evicts, so the advertised set follows the pool.
  * model work runs in the pool's batching engines (``svd_ray.batching``: one per base model, one thread
    each): requests of every task on a base decode together, continuously batched. The event loop only
    submits and awaits; a request whose client goes away (Serve cancels it) or whose deadline
    (``request_timeout_s``) passes is cancelled in the engine, so its rows leave the batch. One small
    thread pool loads bundles, one thread refreshes versions.
  * torch uses as many threads as the replica has CPUs (``ray_actor_options.num_cpus``, rounded, ≥ 1)
    unless ``pool.torch_threads`` says otherwise.
Ingress: auth, rate limits, validation, listing; retries a request once when its model replica dies
(``retries``), and turns every failure into a JSON error.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator

from ray import serve
from ray.serve.handle import DeploymentHandle

from svd_ray.serving.schemas import ApiError, ServeSettings

log = logging.getLogger("svd_ray.serving")

MULTIPLEX_SLOTS = 256  # Serve's own per-replica model LRU; the ModelPool enforces the real bounds


# ------------------------------------------------------------------------------------------- models
@serve.deployment(
    name="TaskModels",
    ray_actor_options={"num_cpus": 0.5},
    max_ongoing_requests=16,
    health_check_period_s=10,
    health_check_timeout_s=60,
    graceful_shutdown_timeout_s=30,
)
class TaskModels:
    def __init__(self, settings: dict):
        import torch

        from svd_ray.batching import EngineConfig
        from svd_ray.serving.pool import ModelPool
        from svd_ray.store import open_store

        s = ServeSettings.model_validate(settings)
        self.settings = s
        torch.set_num_threads(s.pool.torch_threads or _replica_cpus())
        torch.set_flush_denormal(True)
        self.pool = ModelPool(
            open_store(s.store, cache_dir=s.cache_dir), allowed_bases=s.base_models, max_tasks=s.pool.max_tasks,
            max_bytes=s.pool.max_bytes, pin=s.pool.pin, refresh_s=s.pool.refresh_s, device=s.pool.device,
            on_evict=self._on_evict, engine_config=EngineConfig(**s.engine.model_dump()),
        )
        self._waiters = ThreadPoolExecutor(max_workers=64, thread_name_prefix="svd-wait")
        self._loader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="svd-load")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._gauges = _pool_gauges()
        self._refresher = threading.Thread(target=self._refresh_loop, name="svd-refresh", daemon=True)
        self._refresher.start()

    # ------------------------------------------------------------------ pool plumbing
    def _refresh_loop(self) -> None:
        period = min(self.pool.refresh_s, 2.0)
        while not self._stop.wait(period):
            try:
                self.pool.refresh_all()
                self._export_stats()
            except Exception:
                log.exception("refresh loop")

    def _export_stats(self) -> None:
        if not self._gauges:
            return
        st = self.pool.stats()
        try:
            self._gauges["tasks"].set(len(st["tasks"]))
            self._gauges["bytes"].set(st["bytes"])
            for name in ("loads", "evictions", "refreshes", "load_failures"):
                self._gauges[name].set(st[name])
            for base, e in st.get("engines", {}).items():
                tags = {"base_model": base}
                self._gauges["running_rows"].set(e.get("running_rows", 0), tags=tags)
                self._gauges["queued"].set(e.get("queued", 0), tags=tags)
                self._gauges["active"].set(e.get("active_requests", 0), tags=tags)
                self._gauges["tokens"].set(e.get("tokens_out", 0), tags=tags)
                steps = e.get("decode_steps", 0)
                self._gauges["batch_rows"].set(e.get("decode_rows", 0) / steps if steps else 0.0, tags=tags)
        except Exception:
            pass

    def _on_evict(self, task: str) -> None:
        """Drop the task from Serve's multiplexed set too (on the replica's event loop)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._forget_multiplexed, task)

    def _forget_multiplexed(self, task: str) -> None:
        wrapper = getattr(self, "__serve_multiplex_wrapper", None)
        models = getattr(wrapper, "models", None)
        if models is not None and task in models:
            models.pop(task, None)
            try:
                wrapper._push_multiplexed_replica_info = True
            except Exception:
                pass

    @serve.multiplexed(max_num_models_per_replica=MULTIPLEX_SLOTS)
    async def _task_slot(self, task: str) -> str:
        await self._acquire(task)
        return task

    async def _acquire(self, task: str):
        lt = self.pool.get(task)
        if lt is None:
            lt = await asyncio.get_running_loop().run_in_executor(self._loader, self.pool.acquire, task)
        return lt

    async def _entry(self, req: dict):
        from svd_ray.serving.errors import PoolError

        self._loop = asyncio.get_running_loop()
        task = req.get("task")
        model_id = serve.get_multiplexed_model_id()
        if not isinstance(task, str) or not task or (model_id and model_id != task):
            raise PoolError("request task does not match its routing id")
        await self._task_slot(task)
        return await self._acquire(task)

    # ------------------------------------------------------------------ requests
    def _deadline(self) -> float:
        return time.monotonic() + self.settings.request_timeout_s

    async def _await(self, handle):
        """The engine result, without blocking the event loop; cancelling this coroutine cancels the work."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._waiters, handle.result)
        except asyncio.CancelledError:
            handle.cancel()
            raise
        finally:
            self._observe(handle)

    def _observe(self, handle) -> None:
        ttft = self._gauges.get("ttft")
        if ttft is not None and handle.first_token_at is not None:
            try:
                ttft.observe(handle.first_token_at - handle.submitted_at)
            except Exception:
                pass

    async def _run(self, req: dict, submit, respond) -> dict:
        from svd_ray.batching import EngineError
        from svd_ray.serving.errors import PoolError
        from svd_ray.serving.handlers import pool_error

        try:
            lt = await self._entry(req)
            handle = submit(lt, req, self.settings.limits.max_prompt_tokens, tenant=str(req.get("tenant", "default")),
                            deadline=self._deadline())
            out = await self._await(handle)
            return {"ok": True, **respond(lt, handle, out)}
        except EngineError as exc:
            return {"ok": False, "error": pool_error(exc).to_dict()}
        except PoolError as exc:
            return {"ok": False, "error": exc.to_dict()}
        except Exception:
            log.exception("model request failed")
            return {"ok": False, "error": {"status": 500, "type": "internal_error", "message": "model error", "field": None}}

    async def generate(self, req: dict) -> dict:
        from svd_ray.serving.handlers import generate_response, submit_generate

        return await self._run(req, submit_generate, generate_response)

    async def score(self, req: dict) -> dict:
        from svd_ray.serving.handlers import score_response, submit_score

        return await self._run(req, submit_score,
                               lambda lt, handle, out: score_response(lt, handle, out, list(req["choices"])))

    async def generate_stream(self, req: dict) -> AsyncIterator[dict]:
        from svd_ray.serving.errors import InputError, PoolError
        from svd_ray.serving.handlers import stream_event, stream_meta, submit_generate

        try:
            lt = await self._entry(req)
            if int(req["gen"].get("num_beams", 1)) > 1:
                raise InputError("num_beams > 1 cannot be streamed", "body.num_beams")
            handle = submit_generate(lt, req, self.settings.limits.max_prompt_tokens,
                                     tenant=str(req.get("tenant", "default")), deadline=self._deadline())
        except PoolError as exc:
            yield {"event": "error", "error": exc.to_dict()}
            return
        except Exception:
            log.exception("stream setup failed")
            yield {"event": "error", "error": {"status": 500, "type": "internal_error", "message": "model error", "field": None}}
            return
        loop = asyncio.get_running_loop()
        try:
            yield stream_meta(lt, handle)
            while True:
                ev = await loop.run_in_executor(self._waiters, handle.events.get)
                yield stream_event(ev)
                if ev.kind in ("done", "error"):
                    return
        finally:  # the client went away (or the stream ended): stop the work
            handle.cancel()
            self._observe(handle)

    async def stats(self) -> dict:
        return self.pool.stats()

    def record_routing_stats(self) -> dict:
        """This replica's engine load (Serve's per-replica routing-stats hook; Serve polls it, and it can be
        read per replica with ``ray.get_actor(<replica actor>).record_routing_stats.remote()``): requests
        admitted / queued, rows decoding, counters of the work done (tokens, forwards, cancellations) summed
        over the replica's engines, and its pid (for memory sampling)."""
        out = {"pid": os.getpid(), "engines": 0}
        for snap in self.pool.stats().get("engines", {}).values():
            out["engines"] += 1
            for key in ("active_requests", "queued", "running_rows", "reserved_kv_tokens", "tokens_out",
                        "decode_steps", "prefill_forwards", "score_forwards", "requests_done", "cancelled",
                        "deadline_exceeded"):
                out[key] = out.get(key, 0) + int(snap.get(key, 0) or 0)
        return out

    def check_health(self) -> None:
        if not self._refresher.is_alive():
            raise RuntimeError("refresh thread died")

    def __del__(self):
        try:
            self._stop.set()
            self.pool.close()
            self._waiters.shutdown(wait=False, cancel_futures=True)
            self._loader.shutdown(wait=False, cancel_futures=True)
        except Exception:
            pass


def _replica_cpus() -> int:
    """CPUs Ray gave this replica, rounded (≥ 1): torch's thread count."""
    try:
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    except Exception:
        cpus = 1.0
    return max(1, int(round(cpus)))


def _pool_gauges() -> dict:
    try:
        from ray.serve.metrics import Gauge, Histogram

        return {
            "tasks": Gauge("svd_ray_pool_tasks", description="Tasks loaded in this model replica"),
            "bytes": Gauge("svd_ray_pool_bytes", description="Bytes held by base models and tasks"),
            "loads": Gauge("svd_ray_pool_loads", description="Task loads since the replica started"),
            "evictions": Gauge("svd_ray_pool_evictions", description="Task evictions since the replica started"),
            "refreshes": Gauge("svd_ray_pool_refreshes", description="Version swaps since the replica started"),
            "load_failures": Gauge("svd_ray_pool_load_failures", description="Failed task loads"),
            "running_rows": Gauge("svd_ray_engine_running_rows", description="Rows in the decode batch now",
                                  tag_keys=("base_model",)),
            "queued": Gauge("svd_ray_engine_queued_requests", description="Requests waiting for admission",
                            tag_keys=("base_model",)),
            "active": Gauge("svd_ray_engine_active_requests", description="Requests admitted and not finished",
                            tag_keys=("base_model",)),
            "tokens": Gauge("svd_ray_engine_generated_tokens", description="Tokens generated since start "
                            "(rate() = tokens/s)", tag_keys=("base_model",)),
            "batch_rows": Gauge("svd_ray_engine_mean_batch_rows", description="Mean rows per decode step",
                                tag_keys=("base_model",)),
            "ttft": Histogram("svd_ray_engine_time_to_first_token_seconds",
                              description="Submission to first token, in the model replica",
                              boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30]),
        }
    except Exception:
        return {}


# ------------------------------------------------------------------------------------------- backend
class ServeBackend:
    """How the ingress reaches TaskModels: multiplexed by task, with retries, timeouts and clean errors."""

    def __init__(self, handle: DeploymentHandle, settings: ServeSettings, metrics=None):
        self.handle = handle
        self.retries = settings.retries
        self.timeout = settings.request_timeout_s
        self.metrics = metrics

    def _count(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.model_errors.labels(kind, self.metrics.replica).inc()

    def _count_retry(self) -> None:
        if self.metrics is not None:
            self.metrics.retries.labels(self.metrics.replica).inc()

    async def call(self, method: str, task: str, payload: dict) -> dict:
        import ray.exceptions as rex
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

        attempt = 0
        while True:
            resp = getattr(self.handle.options(multiplexed_model_id=task), method).remote(payload)
            try:
                return await asyncio.wait_for(_awaited(resp), self.timeout)
            except asyncio.TimeoutError:
                resp.cancel()
                self._count("timeout")
                raise ApiError(504, "timeout", f"no response within {self.timeout:g} s",
                               headers={"Retry-After": "5"}) from None
            except BackPressureError:
                self._count("backpressure")
                raise ApiError(503, "overloaded", "the model deployment is overloaded; retry later",
                               headers={"Retry-After": "2"}) from None
            except (rex.RayActorError, ReplicaUnavailableError, DeploymentUnavailableError) as exc:
                self._count("replica_failure")
                if attempt < self.retries:
                    attempt += 1
                    self._count_retry()
                    log.warning("model replica failed (%s); retrying %s for task %s", type(exc).__name__, method, task)
                    continue
                raise ApiError(503, "unavailable", "the model replica failed; retry the request",
                               headers={"Retry-After": "2"}) from None
            except rex.RayError as exc:
                self._count("ray_error")
                log.error("model call failed: %s", type(exc).__name__)
                raise ApiError(503, "unavailable", "the model deployment failed; retry the request",
                               headers={"Retry-After": "2"}) from None

    def stream(self, task: str, payload: dict) -> AsyncIterator[dict]:
        return _Stream(self, task, payload)


async def _awaited(resp):
    return await resp


class _Stream:
    """Async iterator over TaskModels.generate_stream; retries (before the first event) on replica death."""

    def __init__(self, backend: ServeBackend, task: str, payload: dict):
        self.backend, self.task, self.payload = backend, task, payload
        self.gen = None
        self.started = False
        self.attempt = 0

    def __aiter__(self):
        return self

    def _open(self):
        h = self.backend.handle.options(multiplexed_model_id=self.task, stream=True)
        self.gen = h.generate_stream.remote(self.payload)

    async def __anext__(self) -> dict:
        import ray.exceptions as rex
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

        while True:
            if self.gen is None:
                self._open()
            try:
                ev = await self.gen.__anext__()
                self.started = True
                return ev
            except StopAsyncIteration:
                raise
            except BackPressureError:
                raise ApiError(503, "overloaded", "the model deployment is overloaded; retry later",
                               headers={"Retry-After": "2"}) from None
            except (rex.RayActorError, ReplicaUnavailableError, DeploymentUnavailableError) as exc:
                self.backend._count("replica_failure")
                if not self.started and self.attempt < self.backend.retries:  # nothing sent yet: safe to retry
                    self.attempt += 1
                    self.gen = None
                    self.backend._count_retry()
                    log.warning("model replica failed (%s); retrying a stream for task %s", type(exc).__name__,
                                self.task)
                    continue
                raise ApiError(503, "unavailable", "the model replica failed; retry the request",
                               headers={"Retry-After": "2"}) from None
            except rex.RayError:
                self.backend._count("ray_error")
                raise ApiError(503, "unavailable", "the model deployment failed; retry the request",
                               headers={"Retry-After": "2"}) from None

    async def aclose(self) -> None:
        if self.gen is not None:
            try:
                self.gen.cancel()
            except Exception:
                pass


# ------------------------------------------------------------------------------------------- ingress
@serve.deployment(
    name="Ingress",
    ray_actor_options={"num_cpus": 0.1},
    max_ongoing_requests=256,
    health_check_period_s=10,
    graceful_shutdown_timeout_s=30,
)
@serve.ingress()
class Ingress:
    def __init__(self, models: DeploymentHandle, settings: dict, auth: dict):
        from svd_ray.serving.app import IngressService
        from svd_ray.serving.auth import AuthState
        from svd_ray.serving.metrics import Metrics

        s = ServeSettings.model_validate(settings)
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:
            replica = str(os.getpid())
        metrics = Metrics(replica)
        self.service = IngressService(s, AuthState.from_dict(auth), ServeBackend(models, s, metrics), metrics=metrics)

    def __serve_build_asgi_app__(self):
        from svd_ray.serving.app import create_app

        return create_app(self.service)


# ------------------------------------------------------------------------------------------- builder
def build_app(args: dict | None = None):
    """Application builder for ``serve run`` / ``serve deploy`` / ``svd-ray serve``: ``args`` = ``ServeSettings``.

    API keys are read here (tenants file and environment, on the cluster) and only their sha256 digests
    are passed to the ingress replicas. Invalid settings raise ``ValueError`` naming the field.
    Replica counts, CPUs/GPUs and autoscaling come from the config's ``deployments:`` section.
    """
    return make_app(args)


def make_app(args: dict | None = None, model_options: dict | None = None, ingress_options: dict | None = None):
    """``build_app`` with optional ``.options()`` for the two deployments (tests, Python callers)."""
    from pydantic import ValidationError

    from svd_ray.serving.auth import load_auth

    try:
        settings = ServeSettings.model_validate(dict(args or {}))
    except ValidationError as exc:
        e = exc.errors()[0]
        raise ValueError(f"serve args: {'.'.join(str(x) for x in e['loc'])}: {e['msg']}") from None
    auth = load_auth(settings.auth)
    plain = settings.model_dump(mode="json")
    models_dep = TaskModels.options(**model_options) if model_options else TaskModels
    ingress_dep = Ingress.options(**ingress_options) if ingress_options else Ingress
    return ingress_dep.bind(models_dep.bind(plain), plain, auth.to_dict())
