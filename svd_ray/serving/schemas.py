"""Request / response models of the HTTP API, the server settings, and the JSON error format.

Every request body is validated strictly (``extra="forbid"``, no string→number coercion, no NaN/inf):
an unknown or mistyped field is a 422 whose body names it::

    {"error": {"type": "invalid_request", "field": "body.max_new_tokens", "message": "...", "status": 422}}

Static bounds live on the models; bounds an operator may change (max prompts, max_new_tokens cap, ...)
are in :class:`Limits` and checked by :func:`check_generate_limits` / :func:`check_score_limits` with
the same error format.
"""
from __future__ import annotations

import json
import math
import re
import sys
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

STEERING_MODES = ("svdecode", "static", "off")
MU_ABS_MAX = 1e6


# ------------------------------------------------------------------------------------------- errors
class ApiError(Exception):
    """An error with an HTTP status, rendered as ``{"error": {...}}`` (never a stack trace)."""

    def __init__(
        self,
        status: int,
        type: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.type, self.message, self.field = status, type, message, field
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> dict:
        err = {"type": self.type, "message": self.message, "field": self.field, "status": self.status}
        err.update(self.extra)
        return {"error": err}

    @classmethod
    def from_dict(cls, err: dict) -> "ApiError":
        retry = err.get("retry_after_s")  # e.g. a store outage: when to come back
        return cls(int(err.get("status", 500)), err.get("type", "internal_error"), err.get("message", "error"),
                   err.get("field"), headers={"Retry-After": str(max(1, int(retry)))} if retry else None)


def invalid(field: str, message: str, status: int = 422) -> ApiError:
    return ApiError(status, "invalid_request", message, field)


def not_found_task(task: str, field: str | None = None) -> ApiError:
    """The one 404 for 'no such task' and 'not yours': the bodies are identical but for the name."""
    shown = task if len(task) <= 80 else task[:77] + "..."
    return ApiError(404, "not_found", f"task {shown!r} not found", field)


_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|literal\[.*\]|function-.*|constrained-.*)$", re.I)


def field_path(loc: tuple) -> str:
    """pydantic loc → ``body.a.b[2]`` (union member tags dropped)."""
    out = "body"
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and _TYPE_TAG.match(part):
            continue
        else:
            out += f".{part}"
    return out


def validation_error(exc: ValidationError) -> ApiError:
    errors = []
    for e in exc.errors(include_url=False, include_context=False, include_input=False):
        msg = e.get("msg", "invalid value")
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        errors.append({"field": field_path(tuple(e.get("loc", ()))), "message": msg})
    first = errors[0] if errors else {"field": "body", "message": "invalid request"}
    return ApiError(422, "invalid_request", f"{first['field']}: {first['message']}", first["field"],
                    extra={"errors": errors[:20]})


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json_body(raw: bytes) -> dict:
    """Strict JSON object (no NaN/Infinity, UTF-8) or a 400/422 naming ``body``."""
    if not raw.strip():
        raise ApiError(400, "invalid_json", "request body is empty; send a JSON object", "body")
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_json", "request body is not UTF-8", "body") from None
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, "invalid_json", f"request body is not valid JSON: {str(exc).splitlines()[0][:200]}",
                       "body") from None
    if not isinstance(data, dict):
        raise ApiError(422, "invalid_request", "request body must be a JSON object", "body")
    return data


def parse_model(model: type[BaseModel], data: dict) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


# ------------------------------------------------------------------------------------------- helpers
def _str_or_list(v: Any) -> Any:
    if isinstance(v, str):
        return [v]
    if isinstance(v, list):
        return v
    raise ValueError("must be a string or a list of strings")


def _stop_list(v: Any) -> Any:
    if v is None:
        return []
    return _str_or_list(v)


_NonEmpty = Annotated[str, Field(min_length=1)]
_Texts = Annotated[list[_NonEmpty], Field(min_length=1)]
# json_schema_input_type: the OpenAPI schema (/openapi.json) shows what is accepted, not the normalised form
Prompts = Annotated[list[_NonEmpty], BeforeValidator(_str_or_list, json_schema_input_type=_NonEmpty | _Texts),
                    Field(min_length=1)]
StopList = Annotated[list[_NonEmpty],
                     BeforeValidator(_stop_list, json_schema_input_type=_NonEmpty | list[_NonEmpty] | None)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _normal_float(v):
    """0 or a normal double: subnormals (0 < |x| < 2.2e-308) are refused. Replicas flush denormals to zero
    (``torch.set_flush_denormal``), so a subnormal accepted here would mean 0 there."""
    if isinstance(v, float) and v != 0.0 and abs(v) < sys.float_info.min:
        raise ValueError(f"must be 0 or at least {sys.float_info.min:.4g} in magnitude (subnormal numbers are not accepted)")
    return v


class _SteeringFields(_Strict):
    # None: the task's default (svdecode, or off when calibration found that steering does not help it)
    steering: Literal["svdecode", "static", "off"] | None = None
    mu: float | None = Field(None, ge=-MU_ABS_MAX, le=MU_ABS_MAX,
                             description="override of the task's calibrated μ̄ (0 = mask only)")
    alpha: float | None = Field(None, ge=0.0, le=1.0, description="override of the plausibility threshold α")

    def steering_dict(self) -> dict:
        return {"mode": self.steering, "mu": self.mu, "alpha": self.alpha}

    @field_validator("mu", "alpha", "temperature", "top_p", "length_penalty", check_fields=False)
    @classmethod
    def _normal(cls, v):
        return _normal_float(v)


# ------------------------------------------------------------------------------------------- requests
class GenerateRequest(_SteeringFields):
    """``POST /v1/tasks/{task}/generate``. ``temperature`` 0 (default) = greedy; > 0 samples."""

    prompt: Prompts
    max_new_tokens: int = Field(32, ge=1)
    min_new_tokens: int = Field(0, ge=0, description="EOS is not chosen before this many tokens")
    temperature: float = Field(0.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=1_000_000)
    num_beams: int = Field(1, ge=1)
    length_penalty: float = Field(1.0, ge=-10.0, le=10.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: StopList = Field(default_factory=list)
    stream: bool = False

    @field_validator("min_new_tokens")
    @classmethod
    def _min_le_max(cls, v, info):
        if v > info.data.get("max_new_tokens", v):
            raise ValueError("must be ≤ max_new_tokens")
        return v


class ScoreRequest(_SteeringFields):
    """``POST /v1/tasks/{task}/score``: log-likelihood of each choice as a continuation of ``prompt``."""

    prompt: str = Field(min_length=1)
    choices: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)
    outside_mask: Literal["unmasked", "floor"] = "unmasked"


_TokenIds = Annotated[list[Annotated[int, Field(ge=0, lt=2**31)]], Field(min_length=1)]


def _is_id(x: Any) -> bool:
    return type(x) is int and 0 <= x < 2**31


def _openai_prompt(v: Any) -> Any:
    """A string, a list of strings, a list of token ids, or a list of lists of token ids (as OpenAI accepts)."""
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and v:
        if all(isinstance(x, str) for x in v):
            return v
        if all(_is_id(x) for x in v):
            return [v]
        if all(isinstance(x, list) and x and all(_is_id(t) for t in x) for x in v):
            return v
    raise ValueError("must be a non-empty string, list of strings, list of token ids (integers ≥ 0) or list of "
                     "non-empty lists of token ids")


class _OpenAIFields(_SteeringFields):
    """What ``/v1/completions`` and ``/v1/chat/completions`` share (``model`` = task id; SVDecode extensions
    steering, mu, alpha, top_k); OpenAI options we do not implement are accepted only at neutral values."""

    model: str = Field(min_length=1, max_length=200)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=1_000_000)
    n: int = Field(1, ge=1, le=128, description="choices per prompt (needs temperature > 0 when > 1; "
                                                 "bounded by limits.max_n and limits.max_prompts)")
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    stop: StopList = Field(default_factory=list)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    user: str | None = Field(None, max_length=256)
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0)
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0)
    logit_bias: dict[str, float] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v):
        if v:
            raise ValueError("logit_bias is not supported")
        return v

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, v):
        if v is not None and set(v) - {"include_usage"}:
            raise ValueError("only include_usage is supported")
        return v


class CompletionRequest(_OpenAIFields):
    """OpenAI ``POST /v1/completions`` (legacy completions: token-id prompts, ``logprobs``, ``echo``)."""

    prompt: Annotated[list[_NonEmpty] | list[list[int]], BeforeValidator(
        _openai_prompt,
        json_schema_input_type=_NonEmpty | _Texts | _TokenIds | Annotated[list[_TokenIds], Field(min_length=1)])]
    max_tokens: int | None = Field(16, ge=0, description="0 only with echo (scoring the prompt)")
    logprobs: int | None = Field(None, ge=0, le=100, description="top alternatives per token (≤ limits.max_logprobs)")
    echo: bool = False
    # SVDecode extension: how log-probs of tokens outside the plausibility mask are reported (as in /score)
    outside_mask: Literal["unmasked", "floor"] = "unmasked"
    # accepted for compatibility, only at their neutral values
    best_of: int | None = Field(None, ge=1, le=128)
    suffix: None = None

    @property
    def token_ids(self) -> bool:
        return bool(self.prompt) and isinstance(self.prompt[0], list)

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v, info):
        if v is not None and v != info.data.get("n", 1):
            raise ValueError("best_of is supported only equal to n (each choice is one sample)")
        return v


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=100_000)
    name: str | None = Field(None, max_length=64)


class ChatCompletionRequest(_OpenAIFields):
    """OpenAI ``POST /v1/chat/completions``: the messages are rendered with the base model's chat template
    (in the model replica), then steered decoding as for completions."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=64)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: Literal[False] | None = None  # accepted only at its neutral value

    def new_tokens(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 64

    def chars(self) -> int:
        return sum(len(m.content) for m in self.messages)


# ------------------------------------------------------------------------------------------- settings
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.I)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(v: Any) -> int:
    """``123``, ``"512MiB"``, ``"2GiB"``, ``"1.5GB"`` → bytes."""
    if isinstance(v, bool):
        raise ValueError("expected a size like 2GiB")
    if isinstance(v, (int, float)):
        if v <= 0 or not math.isfinite(v):
            raise ValueError("size must be positive")
        return int(v)
    m = _SIZE.match(str(v))
    if not m:
        raise ValueError(f"expected a size like 512MiB or 2GiB, got {v!r}")
    n = int(float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()])
    if n <= 0:
        raise ValueError("size must be positive")
    return n


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Limits(_Settings):
    """Per-request bounds (413 for the whole body, 422 naming the field for the rest)."""

    max_body_bytes: int = Field(65536, gt=0)
    max_prompts: int = Field(8, gt=0)
    max_prompt_chars: int = Field(8000, gt=0)
    max_prompt_tokens: int = Field(1024, gt=0)
    max_new_tokens: int = Field(256, gt=0)
    max_beams: int = Field(4, gt=0)
    max_choices: int = Field(16, gt=0)
    max_choice_chars: int = Field(2000, gt=0)
    max_stop: int = Field(4, gt=0)
    max_stop_chars: int = Field(64, gt=0)
    max_n: int = Field(4, gt=0)  # OpenAI n: choices per prompt (and prompts × n ≤ max_prompts)
    max_logprobs: int = Field(5, ge=0)  # OpenAI logprobs: top alternatives per token (OpenAI's own cap is 5)


class EngineSettings(_Settings):
    """The batching engine of each model replica (``svd_ray.batching.EngineConfig``): one per base model."""

    max_rows: int = Field(32, gt=0)  # rows decoded together (a steered sequence takes 2)
    max_kv_tokens: int = Field(65536, gt=0)  # KV entries reserved by admitted requests
    prefill_chunk: int = Field(64, gt=0)  # at most this many tokens per row in one prefill / scoring forward
    step_token_budget: int = Field(32, gt=0)  # prefill / scoring positions (rows × tokens) between decode steps
    score_max_rows: int = Field(8, ge=2)  # rows per scoring forward (a choice takes 2)
    max_blocked_s: float = Field(5.0, gt=0)


class PoolSettings(_Settings):
    """Per model replica: an LRU of loaded tasks bounded by count and bytes, with pins."""

    max_tasks: int = Field(8, gt=0)
    max_bytes: int = Field(4 * 2**30)
    pin: list[str] = Field(default_factory=list)
    refresh_s: float = Field(10.0, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: int | None = Field(None, gt=0)

    @field_validator("max_bytes", mode="before")
    @classmethod
    def _bytes(cls, v):
        return parse_bytes(v)


class RateLimit(_Settings):
    requests_per_second: float = Field(10.0, gt=0)
    burst: int = Field(20, gt=0)


class AuthSettings(_Settings):
    mode: Literal["disabled", "keys"] = "keys"
    tenants_file: str | None = None  # default $SVD_RAY_TENANTS_FILE
    env_var: str = "SVD_RAY_API_KEYS"
    default_rate_limit: RateLimit = RateLimit()
    # cluster: one bucket per tenant shared by every ingress replica (a Ray actor; falls back to per-replica
    # buckets while it is unreachable); replica: each ingress replica has its own (N replicas → N× the rate)
    rate_limit_scope: Literal["cluster", "replica"] = "cluster"


class ServeSettings(_Settings):
    """``args`` of the Serve application (``svd_ray.serving.deployments:build_app``)."""

    store: str | None = None  # None: $SVD_RAY_STORE or the local default store
    cache_dir: str | None = None  # verified bundle cache (None: the store's default)
    base_models: list[str] = Field(default_factory=lambda: ["smollm2-135m", "gemma3-270m", "tiny-llama"])
    auth: AuthSettings = AuthSettings()
    limits: Limits = Limits()
    pool: PoolSettings = PoolSettings()
    engine: EngineSettings = EngineSettings()
    request_timeout_s: float = Field(120.0, gt=0)
    retries: int = Field(1, ge=0, le=5)
    listing_ttl_s: float = Field(5.0, ge=0)
    # /metrics without a key. None (default): public only when auth is disabled; with keys, only tenants
    # marked admin read it. Explicitly true with keys: public, but series labelled by tenant or task are
    # left out (a tenant must never learn another tenant's task names).
    metrics_public: bool | None = None

    @field_validator("auth", mode="before")
    @classmethod
    def _auth_shorthand(cls, v):
        if v == "disabled" or v is False:
            return {"mode": "disabled"}
        if v == "keys" or v is True:
            return {"mode": "keys"}
        return v


# ------------------------------------------------------------------------------------------- limits
def _check_stop(stop: list[str], limits: Limits) -> None:
    if len(stop) > limits.max_stop:
        raise invalid("body.stop", f"at most {limits.max_stop} stop strings are allowed")
    for i, s in enumerate(stop):
        if len(s) > limits.max_stop_chars:
            raise invalid(f"body.stop[{i}]", f"stop strings are limited to {limits.max_stop_chars} characters")


def check_generate_limits(prompts: list[str], max_new_tokens: int, num_beams: int, stop: list[str], limits: Limits,
                          tokens_field: str = "body.max_new_tokens", temperature: float = 0.0,
                          stream: bool = False) -> None:
    if num_beams > 1 and temperature > 0:
        raise invalid("body.num_beams", "num_beams > 1 needs temperature 0 (beam search does not sample)")
    if num_beams > 1 and stream:
        raise invalid("body.num_beams", "num_beams > 1 cannot be streamed; set stream to false")
    if len(prompts) > limits.max_prompts:
        raise invalid("body.prompt", f"at most {limits.max_prompts} prompts per request")
    for i, p in enumerate(prompts):
        if len(p) > limits.max_prompt_chars:
            where = "body.prompt" if len(prompts) == 1 else f"body.prompt[{i}]"
            raise invalid(where, f"prompt is {len(p)} characters; the limit is {limits.max_prompt_chars}")
    if max_new_tokens > limits.max_new_tokens:
        raise invalid(tokens_field, f"must be ≤ {limits.max_new_tokens} (this server's limit)")
    if num_beams > limits.max_beams:
        raise invalid("body.num_beams", f"must be ≤ {limits.max_beams} (this server's limit)")
    _check_stop(stop, limits)


def check_score_limits(req: ScoreRequest, limits: Limits) -> None:
    if len(req.prompt) > limits.max_prompt_chars:
        raise invalid("body.prompt", f"prompt is {len(req.prompt)} characters; the limit is {limits.max_prompt_chars}")
    if len(req.choices) > limits.max_choices:
        raise invalid("body.choices", f"at most {limits.max_choices} choices per request")
    for i, c in enumerate(req.choices):
        if len(c) > limits.max_choice_chars:
            raise invalid(f"body.choices[{i}]", f"choices are limited to {limits.max_choice_chars} characters")


# ------------------------------------------------------------------------------------------- payloads
def check_openai_limits(req: "_OpenAIFields", limits: Limits, prompts: int) -> None:
    """``n`` (sampling only, ≤ max_n, prompts × n ≤ max_prompts) and, for completions, ``logprobs``,
    ``echo``, ``max_tokens`` 0 and token-id prompts."""
    if req.n > 1 and req.temperature == 0:
        raise invalid("body.n", "n > 1 needs temperature > 0 (greedy decoding would return n identical choices)")
    if req.n > limits.max_n:
        raise invalid("body.n", f"must be ≤ {limits.max_n} (this server's limit)")
    if prompts * req.n > limits.max_prompts:
        raise invalid("body.n", f"prompts × n is {prompts * req.n}; the limit is {limits.max_prompts}")
    if not isinstance(req, CompletionRequest):
        return
    if req.logprobs is not None and req.logprobs > limits.max_logprobs:
        raise invalid("body.logprobs", f"must be ≤ {limits.max_logprobs} (this server's limit)")
    if req.stream and req.logprobs is not None:
        raise invalid("body.logprobs", "logprobs are not streamed; set stream to false")
    if req.stream and req.echo:
        raise invalid("body.echo", "echo is not streamed; set stream to false")
    if req.max_tokens == 0 and not req.echo:
        raise invalid("body.max_tokens", "max_tokens 0 needs echo (it scores the prompt only)")
    if req.token_ids:
        for i, ids in enumerate(req.prompt):
            if len(ids) > limits.max_prompt_tokens:
                where = "body.prompt" if len(req.prompt) == 1 else f"body.prompt[{i}]"
                raise invalid(where, f"prompt is {len(ids)} tokens; the limit is {limits.max_prompt_tokens}")


def generation_payload(task: str, prompts: list[str] | list[list[int]], *, max_new_tokens: int, temperature: float,
                       top_p: float, top_k: int, num_beams: int = 1, length_penalty: float = 1.0,
                       seed: int | None = None, stop: list[str] | None = None, steering: dict,
                       tenant: str = "default", min_new_tokens: int = 0, messages: list[dict] | None = None,
                       n: int = 1, logprobs: int | None = None, echo: bool = False,
                       outside_mask: str = "unmasked") -> dict:
    """The plain-dict request the ingress sends to the model deployment (``prompts`` as text, or token ids)."""
    ids = bool(prompts) and isinstance(prompts[0], list)
    out = {
        "task": task,
        "tenant": tenant,
        "prompts": [] if ids else list(prompts),
        "gen": {
            "max_new_tokens": max_new_tokens,
            "min_new_tokens": min_new_tokens,
            "do_sample": temperature > 0,
            "temperature": temperature if temperature > 0 else 1.0,
            "top_k": top_k,
            "top_p": top_p,
            "num_beams": num_beams,
            "length_penalty": length_penalty,
            "seed": seed,
            "stop_strings": list(stop or []),
        },
        "steering": steering,
    }
    if messages is not None:  # chat: the replica renders them with the chat template
        out["messages"] = messages
    if ids:
        out["prompt_ids"] = [list(p) for p in prompts]
    if n != 1:
        out["n"] = n
    if logprobs is not None:
        out["logprobs"] = logprobs
        out["outside_mask"] = outside_mask
    if echo:
        out["echo"] = True
    return out
