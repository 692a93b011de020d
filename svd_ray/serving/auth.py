"""Tenants, API keys (stored as sha256 only) and per-tenant token-bucket rate limits.

Keys come from a tenants file (``serve_configs/tenants.example.yaml``) and/or an environment variable
(default ``SVD_RAY_API_KEYS``); both are read once, where the application is built, and only the
sha256 hex digests travel to the ingress replicas. Clients send ``Authorization: Bearer <key>``.

Tenants file::

    defaults:
      rate_limit: {requests_per_second: 10, burst: 20}
    tenants:
      acme:
        keys_sha256: ["<sha256 hex of the key>"]      # `svd-ray apikey` prints a key and its hash
        tasks: ["arc-easy", "truthfulqa"]             # or "*" for every task in the store
        rate_limit: {requests_per_second: 5, burst: 10}

Environment: ``SVD_RAY_API_KEYS="acme:KEY1,beta:KEY2:task-a|task-b,ops:KEY3:*"``. An entry for a tenant of
the file adds a key to it (and must not name tasks); an entry for a new tenant must name its tasks
(``*`` = all). Keys are random tokens, so a plain sha256 is an adequate verifier (no salt/KDF needed).
"""
from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from svd_ray.serving.schemas import ApiError, AuthSettings, RateLimit

ANONYMOUS = "anonymous"
_SHA = re.compile(r"^[0-9a-f]{64}$")
_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_KEY = re.compile(r"^[\x21-\x7e]{16,256}$")  # printable ASCII, no spaces; ≥ 16 characters


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    import secrets

    return "svd-" + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Tenant:
    name: str
    tasks: frozenset[str] | None  # None = every task
    rate: RateLimit = field(default_factory=RateLimit)
    admin: bool = False  # may read /metrics (every tenant's series) when metrics are private

    def may_use(self, task: str) -> bool:
        return self.tasks is None or task in self.tasks


# ------------------------------------------------------------------------------------------- file
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _TenantSpec(_Strict):
    keys_sha256: list[str] = Field(default_factory=list)
    tasks: list[str] | str
    rate_limit: RateLimit | None = None
    admin: bool = False  # operators: read /metrics (all tenants' series)

    @field_validator("keys_sha256")
    @classmethod
    def _hex(cls, v):
        for h in v:
            if not _SHA.match(h):
                raise ValueError("keys_sha256 entries must be 64 lowercase hex characters (sha256 of the key)")
        return v

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v):
        if isinstance(v, str) and v != "*":
            raise ValueError('tasks must be a list of task names or "*"')
        return v


class _Defaults(_Strict):
    rate_limit: RateLimit | None = None


class _TenantsFile(_Strict):
    defaults: _Defaults = _Defaults()
    tenants: dict[str, _TenantSpec] = Field(default_factory=dict)

    @field_validator("tenants")
    @classmethod
    def _names(cls, v):
        for name in v:
            if not _TENANT.match(name):
                raise ValueError(f"invalid tenant name {name!r}")
        return v


@dataclass
class AuthState:
    """What the ingress needs: mode, tenants and the sha256 → tenant index (no raw keys)."""

    mode: str
    tenants: dict[str, Tenant]
    key_index: dict[str, str]  # sha256 hex → tenant name

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "tenants": {
                n: {"tasks": None if t.tasks is None else sorted(t.tasks), "rate": t.rate.model_dump(),
                    "admin": t.admin}
                for n, t in self.tenants.items()
            },
            "key_index": dict(self.key_index),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "AuthState":
        tenants = {
            n: Tenant(n, None if t["tasks"] is None else frozenset(t["tasks"]), RateLimit(**t["rate"]),
                      bool(t.get("admin", False)))
            for n, t in d["tenants"].items()
        }
        return cls(d["mode"], tenants, dict(d["key_index"]))


def _tasks(spec: list[str] | str) -> frozenset[str] | None:
    return None if spec == "*" or spec == ["*"] else frozenset(spec)


def parse_env_keys(value: str) -> list[tuple[str, str, frozenset[str] | None | str]]:
    """``tenant:key[:tasks]`` entries (comma separated) → (tenant, key, tasks | None (all) | "inherit")."""
    out = []
    for raw in re.split(r"[,\s]+", value.strip()):
        if not raw:
            continue
        parts = raw.split(":")
        if len(parts) not in (2, 3):
            raise ValueError("API key entries must look like tenant:key or tenant:key:task-a|task-b or tenant:key:*")
        tenant, key = parts[0], parts[1]
        if not _TENANT.match(tenant):
            raise ValueError(f"invalid tenant name {tenant!r} in the API key variable")
        if not _KEY.match(key):
            raise ValueError(f"the API key of tenant {tenant!r} must be 16-256 printable characters without spaces")
        tasks: frozenset[str] | None | str = "inherit"
        if len(parts) == 3:
            tasks = None if parts[2] == "*" else frozenset(t for t in parts[2].split("|") if t)
            if tasks is not None and not tasks:
                raise ValueError(f"tenant {tenant!r}: empty task list in the API key variable")
        out.append((tenant, key, tasks))
    return out


def load_auth(settings: AuthSettings, environ: dict | None = None) -> AuthState:
    """Build the auth state from the settings, the tenants file and the environment (fail closed)."""
    env = os.environ if environ is None else environ
    default_rate = settings.default_rate_limit
    if settings.mode == "disabled":
        return AuthState("disabled", {ANONYMOUS: Tenant(ANONYMOUS, None, default_rate)}, {})

    tenants: dict[str, Tenant] = {}
    index: dict[str, str] = {}
    path = settings.tenants_file or env.get("SVD_RAY_TENANTS_FILE")
    if path:
        p = Path(os.path.expandvars(os.path.expanduser(path)))
        if not p.is_file():
            raise ValueError(f"auth.tenants_file {str(p)!r} does not exist (use an absolute path)")
        try:
            spec = _TenantsFile.model_validate(yaml.safe_load(p.read_text()) or {})
        except ValidationError as exc:
            e = exc.errors()[0]
            where = ".".join(str(x) for x in e["loc"])
            raise ValueError(f"{p}: {where}: {e['msg']}") from None
        default_rate = spec.defaults.rate_limit or default_rate
        for name, t in spec.tenants.items():
            tenants[name] = Tenant(name, _tasks(t.tasks), t.rate_limit or default_rate, t.admin)
            for h in t.keys_sha256:
                if h in index and index[h] != name:
                    raise ValueError(f"the same key hash is listed for tenants {index[h]!r} and {name!r}")
                index[h] = name
    raw = env.get(settings.env_var, "")
    if raw:
        for name, key, tasks in parse_env_keys(raw):
            if name in tenants:
                if tasks != "inherit":
                    raise ValueError(f"tenant {name!r} is defined in the tenants file: do not name its tasks in "
                                     f"{settings.env_var}")
            else:
                if tasks == "inherit":
                    raise ValueError(f"tenant {name!r} is not in the tenants file: name its tasks in "
                                     f"{settings.env_var} (tenant:key:task-a|task-b or tenant:key:*)")
                tenants[name] = Tenant(name, tasks, default_rate)
            h = hash_key(key)
            if h in index and index[h] != name:
                raise ValueError(f"the same key is given for tenants {index[h]!r} and {name!r}")
            index[h] = name
    if not index:
        raise ValueError(
            "auth mode is 'keys' but no API keys are configured: set auth.tenants_file / $SVD_RAY_TENANTS_FILE "
            f"or ${settings.env_var} (or auth: disabled for a local, single-user server)"
        )
    return AuthState("keys", tenants, index)


# ------------------------------------------------------------------------------------------- checks
def unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, "header.authorization",
                    headers={"WWW-Authenticate": 'Bearer realm="svd-ray"'})


class Authenticator:
    def __init__(self, state: AuthState):
        self.state = state

    @property
    def disabled(self) -> bool:
        return self.state.mode == "disabled"

    def authenticate(self, authorization: str | None) -> Tenant:
        if self.disabled:
            return self.state.tenants[ANONYMOUS]
        if not authorization:
            raise unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        scheme, _, key = authorization.strip().partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise unauthorized("malformed Authorization header: expected 'Bearer <key>'")
        digest = hash_key(key)
        name = None
        for h, tenant in self.state.key_index.items():  # constant-time compare against every entry
            if hmac.compare_digest(h, digest):
                name = tenant
        if name is None or name not in self.state.tenants:
            raise unauthorized("invalid API key")
        return self.state.tenants[name]

    def visible(self, tenant: Tenant, tasks: Iterable[str]) -> list[str]:
        return [t for t in tasks if tenant.may_use(t)]


# ------------------------------------------------------------------------------------------- rate limit
class TokenBucket:
    """``rate`` tokens per second up to ``burst``; one request costs one token."""

    def __init__(self, rate: float, burst: int, clock=time.monotonic):
        self.rate, self.burst, self.clock = float(rate), float(burst), clock
        self.tokens = float(burst)
        self.updated = clock()

    def take(self, cost: float = 1.0) -> float:
        """0.0 if allowed, else the seconds until ``cost`` tokens are available."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        return (cost - self.tokens) / self.rate


class RateLimiter:
    """Per-tenant buckets, local to one ingress replica (see docs/SERVING.md)."""

    def __init__(self, clock=time.monotonic):
        self._buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()
        self.clock = clock

    def check(self, tenant: Tenant) -> None:
        with self._lock:
            bucket = self._buckets.get(tenant.name)
            if bucket is None:
                bucket = self._buckets[tenant.name] = TokenBucket(
                    tenant.rate.requests_per_second, tenant.rate.burst, self.clock)
            wait = bucket.take()
        if wait > 0:
            raise rate_limited(tenant, wait)


# ------------------------------------------------------------------------------------------- cluster-wide
RATE_LIMIT_ACTOR = "svd-ray-rate-limits"


class RateLimitLedger:
    """The tenants' token buckets for the whole cluster, in one Ray actor (named ``RATE_LIMIT_ACTOR``,
    detached, 0 CPUs) that every ingress replica asks before admitting a request — so a tenant's limit
    holds however many ingress replicas there are. ``take`` is a few microseconds of work; the cost per
    request is one actor round trip (~1 ms on one node)."""

    def __init__(self):
        self._buckets: dict[str, TokenBucket] = {}

    def take(self, tenant: str, rate: float, burst: int) -> float:
        bucket = self._buckets.get(tenant)
        if bucket is None or (bucket.rate, bucket.burst) != (float(rate), float(burst)):
            bucket = self._buckets[tenant] = TokenBucket(rate, burst)
        return bucket.take()

    def ping(self) -> bool:
        return True


def rate_limited(tenant: Tenant, wait: float) -> ApiError:
    retry = max(1, math.ceil(wait))
    who = "this server (auth disabled: one limit for all clients)" if tenant.name == ANONYMOUS else "this API key"
    return ApiError(429, "rate_limited",
                    f"rate limit exceeded for {who} ({tenant.rate.requests_per_second:g} requests/s, "
                    f"burst {tenant.rate.burst}); retry after {retry} s",
                    None, headers={"Retry-After": str(retry)})


class ClusterRateLimiter:
    """Per-tenant limits shared by every ingress replica through the ``RateLimitLedger`` actor.

    When the ledger cannot be reached (not created yet, its node died, or it does not answer within
    ``timeout_s``) the replica falls back to its own per-replica buckets at the tenant's full rate — it
    fails open to the old per-replica behaviour rather than refusing traffic, counts ``fallbacks`` (exported
    as ``svd_ray_rate_limit_fallback_total``), and tries the ledger again after ``retry_s``."""

    def __init__(self, namespace: str | None = None, timeout_s: float = 2.0, retry_s: float = 5.0,
                 clock=time.monotonic):
        self.local = RateLimiter(clock)
        self.namespace, self.timeout_s, self.retry_s, self.clock = namespace, timeout_s, retry_s, clock
        self._actor = None
        self._down_until = 0.0
        self.fallbacks = 0

    def _ledger(self):
        import ray

        if self._actor is None:
            opts = dict(name=RATE_LIMIT_ACTOR, lifetime="detached", get_if_exists=True, num_cpus=0,
                        max_restarts=-1)
            if self.namespace is not None:
                opts["namespace"] = self.namespace
            self._actor = ray.remote(RateLimitLedger).options(**opts).remote()
        return self._actor

    async def check(self, tenant: Tenant) -> None:
        import asyncio

        if self.clock() >= self._down_until:
            try:
                import ray

                if not ray.is_initialized():  # an app outside Ray (tests): never start a Ray just for this
                    raise RuntimeError("no Ray")
                ref = self._ledger().take.remote(tenant.name, tenant.rate.requests_per_second, tenant.rate.burst)
                wait = await asyncio.wait_for(asyncio.wrap_future(ref.future()), self.timeout_s)
            except Exception:  # noqa: BLE001 — unreachable ledger: documented fallback below
                self._actor = None
                self._down_until = self.clock() + self.retry_s
            else:
                if wait > 0:
                    raise rate_limited(tenant, wait)
                return
        self.fallbacks += 1
        self.local.check(tenant)
