"""Per-replica pool of loaded tasks, and the model work the replica runs for a request.

Memory layout (one model replica)
  * one **master copy** of each base model the loaded tasks need (never run itself), counted once;
  * per task, its own module tree that **shares the master's parameter tensors** (``copy.deepcopy`` with
    every parameter pre-seeded in the memo) with the task's adapter attached by
    ``TaskModel.from_bundle``. LoRA/IA3 wrap Linear modules of *that* tree and prompt methods wrap
    *that* tree, so tasks never see each other's adapters, no ``set_adapter`` switching is needed and
    ``DualModel`` sees exactly the model ``from_bundle`` would build — at the memory cost of the
    adapter (+ a few small buffers) per task instead of a whole model copy.

Bounds: at most ``max_tasks`` tasks and ``max_bytes`` bytes (masters + per-task tensors). Least
recently used unpinned tasks are evicted first, then unused masters. Pinned tasks are loaded at
start-up and never evicted. An evicted entry stays valid for requests already holding it.

Versions: a task resolves to its promoted version if it has one, else its latest version. Every
``refresh_s`` the loaded tasks are checked; a changed version is loaded in the background and
swapped in atomically (in-flight requests finish on the version they started with). A failed
refresh keeps serving the old version; a task deleted from the store is unloaded.

Model work: each base model has one batching ``Engine`` (``svd_ray.batching``) over an ``AdapterBank``
that shares the master's parameters; every loaded task registers its adapter there, so requests of all
tasks on that base decode together in one batch. A replaced or evicted task's adapter is retired once
no request uses it. The tokenizer is shared by the request threads and the engine: use it under
``BaseEntry.tokenizer_lock``.
"""
from __future__ import annotations

import copy
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from svd_ray.serving.errors import PoolError, TaskNotFound, TaskUnavailable

REFRESH_BACKOFF_MAX_S = 300.0  # longest wait between version checks while the store keeps failing
from svd_ray.store import (IntegrityError, InvalidNameError, MismatchError, NotFoundError, StoreError,
                           StoreUnavailable)

log = logging.getLogger("svd_ray.serving.pool")



# ------------------------------------------------------------------------------------------- entries
@dataclass
class BaseEntry:
    id: str
    model: torch.nn.Module  # master copy: its parameters are shared by every task tree
    tokenizer: object
    fingerprint: dict
    nbytes: int
    storages: frozenset[int]
    max_positions: int | None
    engine: object = None  # svd_ray.batching.Engine over this base (one per replica and base)
    tokenizer_lock: object = field(default_factory=threading.Lock)
    pending: int = 0  # task loads in progress on this base
    last_used: float = 0.0
    dropped: bool = False  # released from the pool: its engine is stopping, with every adapter on it


@dataclass
class LoadedTask:
    task: str
    version: str
    base_id: str
    method: str | None
    tm: object  # svd_ray.engine.TaskModel
    nbytes: int
    loaded_at: float
    num_virtual: int = 0
    max_positions: int | None = None
    last_used: float = 0.0
    checked_at: float = 0.0
    adapter: object = None  # svd_ray.batching.Adapter: this version's slot in its base's engine
    base: object = None  # BaseEntry

    @property
    def engine(self):
        return self.base.engine

    def info(self) -> dict:
        d = self.tm.data
        return {"task": self.task, "version": self.version, "base_model": self.base_id, "method": self.method,
                "mu": d.mu, "alpha": d.alpha, "estimator": d.estimator, "static_available": d.mean_delta is not None}


def _storage_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (_storage_ptr(t), t.device.type)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def _shared_base_hazard(bundle_dir) -> str | None:
    """Adapter settings that would write into the (shared) base weights when attached, or change its layers."""
    import json
    from pathlib import Path

    try:
        cfg = json.loads((Path(bundle_dir) / "adapter" / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        return f"unreadable adapter_config.json ({exc})"
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() != "gaussian":  # pissa / olora / corda / eva... rewrite base weights
        return f"init_lora_weights={init!r} modifies base weights"
    if cfg.get("layer_replication"):
        return "layer_replication changes the base model's layers"
    return None


def share_weights_clone(model: torch.nn.Module) -> torch.nn.Module:
    """A new module tree whose parameters are the very same tensors as ``model``'s (buffers are copied)."""
    memo = {id(p): p for p in model.parameters()}
    return copy.deepcopy(model, memo)


# ------------------------------------------------------------------------------------------- pool
class ModelPool:
    def __init__(
        self,
        store,
        *,
        allowed_bases: list[str],
        max_tasks: int = 8,
        max_bytes: int = 4 * 2**30,
        pin: list[str] | None = None,
        refresh_s: float = 10.0,
        device: str = "cpu",
        on_evict: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        engine_config=None,
    ):
        self.store = store
        self.allowed_bases = list(allowed_bases)
        self.max_tasks, self.max_bytes = int(max_tasks), int(max_bytes)
        self.pin = list(dict.fromkeys(pin or []))
        self.refresh_s = float(refresh_s)
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if device == "auto" else device))
        self.on_evict = on_evict
        self.clock = clock
        self.engine_config = engine_config  # svd_ray.batching.EngineConfig (None: its defaults)
        self._lock = threading.RLock()
        self._tasks: dict[str, LoadedTask] = {}
        self._bases: dict[str, BaseEntry] = {}
        self._inflight: dict[tuple, Future] = {}
        self._fingerprints: dict[str, dict] = {}
        self.counters = {"loads": 0, "evictions": 0, "refreshes": 0, "load_failures": 0, "refresh_failures": 0}
        self._refresh_delay: dict[str, float] = {}  # task → current back-off while refreshing it fails

    # ------------------------------------------------------------------ queries
    def get(self, task: str) -> LoadedTask | None:
        with self._lock:
            lt = self._tasks.get(task)
            if lt is not None:
                lt.last_used = self.clock()
            return lt

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._tasks)

    def total_bytes(self) -> int:
        with self._lock:
            return sum(b.nbytes for b in self._bases.values()) + sum(t.nbytes for t in self._tasks.values())

    def stats(self) -> dict:
        with self._lock:
            return {
                "device": str(self.device),
                "tasks": {t: {"version": e.version, "bytes": e.nbytes, "pinned": t in self.pin, "method": e.method}
                          for t, e in self._tasks.items()},
                "bases": {b: {"bytes": e.nbytes} for b, e in self._bases.items()},
                "engines": {b: e.engine.snapshot() for b, e in self._bases.items() if e.engine is not None},
                "bytes": self.total_bytes(),
                "max_bytes": self.max_bytes,
                "max_tasks": self.max_tasks,
                **self.counters,
            }

    # ------------------------------------------------------------------ loading
    def resolve(self, task: str) -> str:
        """The version to serve: the promoted one if any, else the latest. Raises TaskNotFound."""
        try:
            promoted = self.store.promoted(task)
            return promoted if promoted is not None else self.store.resolve(task, "latest")
        except (NotFoundError, InvalidNameError):
            raise TaskNotFound(f"task {task!r} not found") from None
        except StoreUnavailable as exc:
            log.warning("store unavailable resolving %s: %s", task, exc)
            raise TaskUnavailable(f"task {task!r} is not loaded and the model store is unreachable; retry later",
                                  retry_after_s=exc.retry_after_s) from None
        except StoreError as exc:
            log.error("store error resolving %s: %s", task, exc)
            raise TaskUnavailable(f"task {task!r} is temporarily unavailable (store error)") from None

    def acquire(self, task: str) -> LoadedTask:
        """The loaded task, loading it first (blocking; concurrent callers share one load)."""
        lt = self.get(task)
        if lt is not None:
            return lt
        version = self.resolve(task)
        return self._single_flight(("task", task, version), lambda: self._load_and_insert(task, version))

    def _single_flight(self, key: tuple, fn):
        with self._lock:
            fut = self._inflight.get(key)
            owner = fut is None
            if owner:
                fut = self._inflight[key] = Future()
        if not owner:
            return fut.result()
        try:
            result = fn()
        except BaseException as exc:
            fut.set_exception(exc)
            raise
        else:
            fut.set_result(result)
            return result
        finally:
            with self._lock:
                self._inflight.pop(key, None)

    def _load_and_insert(self, task: str, version: str) -> LoadedTask:
        with self._lock:
            cur = self._tasks.get(task)
            if cur is not None and cur.version == version:
                return cur
        lt = self._load_task(task, version)
        self._insert(lt)
        return lt

    def _fingerprint(self, base_id: str) -> dict:
        from svd_ray.models import model_fingerprint, resolve_model

        fp = self._fingerprints.get(base_id)
        if fp is None:
            fp = self._fingerprints[base_id] = model_fingerprint(resolve_model(base_id))
        return fp

    def _base(self, base_id: str) -> BaseEntry:
        with self._lock:
            b = self._bases.get(base_id)
            if b is not None:
                return b
        return self._single_flight(("base", base_id), lambda: self._load_base(base_id))

    def _load_base(self, base_id: str) -> BaseEntry:
        from svd_ray.models import load_base_model, load_tokenizer, resolve_model

        with self._lock:
            if base_id in self._bases:
                return self._bases[base_id]
        t0 = time.perf_counter()
        ref = resolve_model(base_id)
        model = load_base_model(ref).to(self.device)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        tok = load_tokenizer(ref)
        tensors = list(model.parameters()) + list(model.buffers())
        entry = BaseEntry(
            id=base_id, model=model, tokenizer=tok, fingerprint=self._fingerprint(base_id),
            nbytes=_tensor_bytes(tensors), storages=frozenset(_storage_ptr(p) for p in model.parameters()),
            max_positions=getattr(model.config, "max_position_embeddings", None), last_used=self.clock(),
        )
        entry.engine = self._start_engine(entry)
        with self._lock:
            self._bases[base_id] = entry
        log.info("loaded base model %s (%.1f MB) in %.1fs", base_id, entry.nbytes / 1e6, time.perf_counter() - t0)
        return entry

    def _start_engine(self, base: BaseEntry):
        from dataclasses import replace as dc_replace

        from svd_ray.batching import AdapterBank, Engine, EngineConfig

        cfg = dc_replace(self.engine_config or EngineConfig(), max_positions=base.max_positions)
        return Engine(AdapterBank(base.model), base.tokenizer, cfg, tokenizer_lock=base.tokenizer_lock).start()

    def _release(self, lt: LoadedTask) -> None:
        """The task version left the pool: retire its adapter (requests already holding it finish first).
        Not when its base was dropped: that engine is stopping (nothing would run the retirement, and the
        call would wait for an engine thread that is gone)."""
        if lt.adapter is not None and lt.base is not None and lt.base.engine is not None and not lt.base.dropped:
            try:
                lt.base.engine.remove_adapter(lt.adapter)
            except Exception:
                log.exception("retiring the adapter of %s@%s failed", lt.task, lt.version)

    def close(self) -> None:
        """Stop every engine (queued and running requests fail with 503)."""
        with self._lock:
            bases = list(self._bases.values())
        for b in bases:
            if b.engine is not None:
                b.engine.stop()

    def _load_task(self, task: str, version: str) -> LoadedTask:
        """Fetch (verified) and build one task version. Heavy; runs without the pool lock."""
        from svd_ray.engine import TaskModel

        t0 = time.perf_counter()
        try:
            manifest = self.store.manifest(task, version)
            base_id = manifest.base_model_id
            if base_id not in self.allowed_bases:
                log.error("task %s@%s needs base model %r, not in base_models %s", task, version, base_id,
                          self.allowed_bases)
                raise TaskUnavailable(f"task {task!r} was trained for a base model this deployment does not serve")
            fp = self._fingerprint(base_id)
            expect = {"base_model_id": base_id, "weights_sha256": fp.get("weights_sha256"),
                      "tokenizer_sha256": fp.get("tokenizer_sha256")}
            path, manifest = self.store.fetch(task, version, expect=expect)
        except PoolError:
            self.counters["load_failures"] += 1
            raise
        except (NotFoundError, InvalidNameError):
            raise TaskNotFound(f"task {task!r} not found") from None
        except (IntegrityError, MismatchError) as exc:
            self.counters["load_failures"] += 1
            log.error("task %s@%s failed verification: %s", task, version, exc)
            raise TaskUnavailable(f"task {task!r} is unavailable: its bundle failed verification") from None
        except StoreUnavailable as exc:
            self.counters["load_failures"] += 1
            log.warning("store unavailable loading %s@%s: %s", task, version, exc)
            raise TaskUnavailable(f"task {task!r} is not loaded and the model store is unreachable; retry later",
                                  retry_after_s=exc.retry_after_s) from None
        except StoreError as exc:
            self.counters["load_failures"] += 1
            log.error("store error loading %s@%s: %s", task, version, exc)
            raise TaskUnavailable(f"task {task!r} is temporarily unavailable (store error)") from None

        problem = _shared_base_hazard(path)
        if problem:
            self.counters["load_failures"] += 1
            log.error("task %s@%s: %s", task, version, problem)
            raise TaskUnavailable(f"task {task!r} is unavailable: its adapter type cannot be served here")
        base = self._base(base_id)
        with self._lock:
            base.pending += 1
        try:
            tree = share_weights_clone(base.model)
            tm = TaskModel.from_bundle(path, model=base_id, base_model=tree, tokenizer=base.tokenizer)
            tm.peft_model.to(self.device)
            tm.peft_model.eval()
            if tm.data.mean_delta is not None:
                tm.data.mean_delta = tm.data.mean_delta.to(self.device)
            adapter = base.engine.add_adapter(f"{task}@{version}", tm.peft_model, tm.data.mean_delta)
        except Exception:
            self.counters["load_failures"] += 1
            log.exception("building task %s@%s failed", task, version)
            raise TaskUnavailable(f"task {task!r} is unavailable: its bundle could not be loaded") from None
        finally:
            with self._lock:
                base.pending -= 1
        own = [t for t in list(tm.peft_model.parameters()) + list(tm.peft_model.buffers())
               if _storage_ptr(t) not in base.storages]
        extra = [tm.data.mean_delta] if tm.data.mean_delta is not None else []
        now = self.clock()
        lt = LoadedTask(task=task, version=version, base_id=base_id, method=tm.method, tm=tm,
                        nbytes=_tensor_bytes(own + extra), loaded_at=now, num_virtual=tm.dual.num_virtual,
                        max_positions=base.max_positions, last_used=now, checked_at=now, adapter=adapter, base=base)
        self.counters["loads"] += 1
        log.info("loaded task %s@%s (%s, %.2f MB own) in %.2fs", task, version, lt.method, lt.nbytes / 1e6,
                 time.perf_counter() - t0)
        return lt

    def _insert(self, lt: LoadedTask) -> None:
        victims: list[LoadedTask] = []
        try:
            with self._lock:
                old = self._tasks.get(lt.task)
                self._tasks[lt.task] = lt
                victims = self._evict_locked(keep=lt.task)
                if self._over_budget() and lt.task not in self.pin:
                    # even after evicting everything evictable the new task does not fit
                    if old is not None:
                        self._tasks[lt.task] = old
                    else:
                        del self._tasks[lt.task]
                    self._drop_unused_bases_locked()
                    self._release(lt)
                    raise TaskUnavailable(f"task {lt.task!r} does not fit in this replica's memory budget "
                                          f"(pool.max_bytes = {self.max_bytes} bytes)")
                if old is not None and old is not lt:
                    self._release(old)  # the new version serves from now on; the old one's requests finish
        finally:
            for v in victims:
                self._release(v)
                self._notify_evicted(v.task)

    def _over_budget(self) -> bool:
        return self.total_bytes() > self.max_bytes

    def _evict_locked(self, keep: str | None = None) -> list[LoadedTask]:
        evicted: list[LoadedTask] = []
        while len(self._tasks) > self.max_tasks or self._over_budget():
            candidates = [t for t in self._tasks.values() if t.task != keep and t.task not in self.pin]
            if not candidates:
                break
            victim = min(candidates, key=lambda t: t.last_used)
            del self._tasks[victim.task]
            self.counters["evictions"] += 1
            evicted.append(victim)
            log.info("evicted task %s@%s (LRU)", victim.task, victim.version)
            if not self._over_budget() and len(self._tasks) <= self.max_tasks:
                break
        self._drop_unused_bases_locked()
        return evicted

    def _drop_unused_bases_locked(self) -> None:
        if not self._over_budget():
            return
        used = {t.base_id for t in self._tasks.values()}
        for b in sorted(self._bases.values(), key=lambda b: b.last_used):
            if b.id not in used and b.pending == 0 and self._over_budget():
                del self._bases[b.id]
                b.dropped = True
                if b.engine is not None:  # stopping joins its thread: not under the pool lock
                    threading.Thread(target=b.engine.stop, name="svd-engine-stop", daemon=True).start()
                log.info("released base model %s", b.id)

    def _notify_evicted(self, task: str) -> None:
        if self.on_evict is not None:
            try:
                self.on_evict(task)
            except Exception:  # never let bookkeeping break a request
                log.exception("on_evict(%s) failed", task)

    def evict(self, task: str) -> bool:
        with self._lock:
            lt = self._tasks.pop(task, None)
            if lt is not None:
                self.counters["evictions"] += 1
                self._drop_unused_bases_locked()
        if lt is not None:
            self._release(lt)
            self._notify_evicted(task)
        return lt is not None

    # ------------------------------------------------------------------ refresh
    def due_for_refresh(self) -> list[str]:
        now = self.clock()
        with self._lock:
            due = [t for t, e in self._tasks.items() if now - e.checked_at >= self.refresh_s]
            missing_pins = [t for t in self.pin if t not in self._tasks]
        return due + missing_pins

    def refresh(self, task: str) -> str | None:
        """Check the task's current version; load and swap in a new one. Returns the new version or None."""
        with self._lock:
            lt = self._tasks.get(task)
            if lt is not None:
                lt.checked_at = self.clock()
        if lt is None:
            if task in self.pin:
                try:
                    return self.acquire(task).version
                except PoolError as exc:
                    log.warning("pinned task %s could not be loaded: %s", task, exc.message)
            return None
        try:
            version = self.resolve(task)
        except TaskNotFound:
            log.warning("task %s no longer exists in the store; unloading it", task)
            self.evict(task)
            return None
        except PoolError as exc:
            # back off (doubling, at most REFRESH_BACKOFF_MAX_S) while the store fails; keep serving lt
            with self._lock:
                delay = min(2 * self._refresh_delay.get(task, self.refresh_s / 2), REFRESH_BACKOFF_MAX_S)
                self._refresh_delay[task] = delay
                lt.checked_at = self.clock() + delay - self.refresh_s
            self.counters["refresh_failures"] += 1
            log.warning("refresh of %s failed (keeping %s; next try in %.0f s): %s", task, lt.version, delay,
                        exc.message)
            return None
        self._refresh_delay.pop(task, None)  # the store answered: back to the normal period
        if version == lt.version:
            return None
        try:
            new = self._single_flight(("task", task, version), lambda: self._load_and_insert(task, version))
        except PoolError as exc:
            log.warning("loading %s@%s failed; still serving %s: %s", task, version, lt.version, exc.message)
            return None
        self.counters["refreshes"] += 1
        log.info("task %s: now serving version %s (was %s)", task, new.version, lt.version)
        return new.version

    def refresh_all(self) -> list[str]:
        changed = []
        for task in self.due_for_refresh():
            if self.refresh(task):
                changed.append(task)
        return changed


