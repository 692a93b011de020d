"""The model replica's request handlers: validated request → engine request → response body.

Prompts are tokenised once, here; the engine (``svd_ray.batching``) does all model work on its own
thread, batched with every other request on the same base model. ``submit_*`` return the engine's
``RequestHandle`` (the async deployment awaits it and cancels it when the client goes away);
``run_*`` are the blocking forms (tests, scripts).
"""
from __future__ import annotations

import queue
from typing import Callable

from svd_ray.batching import EngineError, GenerateRequest, ScoreRequest
from svd_ray.serving.errors import InputError, PoolError
from svd_ray.serving.pool import LoadedTask


def pool_error(exc: EngineError) -> PoolError:
    """An engine error in the replica's error type (same status, type and field; fields under ``body.``)."""
    err = PoolError(exc.message, None if exc.field is None else f"body.{exc.field}")
    err.status, err.type = exc.status, exc.type
    return err


def _steering(lt: LoadedTask, spec: dict):
    try:
        return lt.tm.steering(mode=spec.get("mode"), mu=spec.get("mu"), alpha=spec.get("alpha"))
    except ValueError as exc:
        raise InputError(f"steering: {exc}", "body.steering") from None


def _check_lengths(lt: LoadedTask, counts: list[int], max_new_tokens: int, max_prompt_tokens: int,
                   field_name: str = "body.prompt") -> None:
    for i, n in enumerate(counts):
        where = field_name if len(counts) == 1 else f"{field_name}[{i}]"
        if n < 1:
            raise InputError("prompt encodes to no tokens", where)
        if n > max_prompt_tokens:
            raise InputError(f"prompt is {n} tokens; the limit is {max_prompt_tokens}", where)
        if lt.max_positions and n + max_new_tokens + lt.num_virtual > lt.max_positions:
            raise InputError(
                f"prompt ({n} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context of "
                f"{lt.max_positions - lt.num_virtual} tokens", where)


def _gen_config(spec: dict, eos: tuple[int, ...]):
    from svd_ray.decoding import GenerationConfig

    try:
        return GenerationConfig(
            max_new_tokens=int(spec["max_new_tokens"]), min_new_tokens=int(spec.get("min_new_tokens", 0)),
            do_sample=bool(spec["do_sample"]),
            temperature=float(spec["temperature"]), top_k=int(spec["top_k"]), top_p=float(spec["top_p"]),
            num_beams=int(spec.get("num_beams", 1)), length_penalty=float(spec.get("length_penalty", 1.0)),
            seed=spec.get("seed"), stop_strings=tuple(spec.get("stop_strings") or ()), eos_token_ids=eos,
        )
    except ValueError as exc:
        field = next((f"body.{k}" for k in ("min_new_tokens", "max_new_tokens", "temperature", "top_p", "top_k")
                      if str(exc).startswith(k)), "body")
        raise InputError(str(exc), field) from None


def _encode(lt: LoadedTask, texts: list[str]) -> list[list[int]]:
    with lt.base.tokenizer_lock:
        return [list(ids) for ids in lt.tm.tokenizer(texts, add_special_tokens=True)["input_ids"]]


def render_chat(lt: LoadedTask, messages: list[dict]) -> str:
    """The base model's chat template applied to ``messages`` (with the assistant turn opened)."""
    tok = lt.tm.tokenizer
    if not getattr(tok, "chat_template", None):
        raise InputError("this task's base model has no chat template; use /v1/completions", "body.messages")
    try:
        with lt.base.tokenizer_lock:
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # a template may refuse a message order (e.g. two system turns)
        raise InputError(f"the chat template refused these messages: {str(exc)[:200]}", "body.messages") from None


def _steering_info(steering) -> dict:
    if steering.mode == "off":  # μ and α do not act: do not report them as if they did
        return {"mode": "off", "mu": None, "alpha": None}
    return {"mode": steering.mode, "mu": float(steering.mu), "alpha": float(steering.alpha)}


def _submit(lt: LoadedTask, req):
    try:
        return lt.engine.submit(req)
    except EngineError as exc:
        raise pool_error(exc) from None


# ------------------------------------------------------------------------------------------- generate
def submit_generate(lt: LoadedTask, req: dict, max_prompt_tokens: int = 1024, *, tenant: str = "default",
                    deadline: float | None = None):
    tok = lt.tm.tokenizer
    eos = (tok.eos_token_id,) if tok.eos_token_id is not None else ()
    gen = _gen_config(req["gen"], eos)
    steering = _steering(lt, req.get("steering") or {})
    texts = [render_chat(lt, req["messages"])] if req.get("messages") is not None else list(req["prompts"])
    prompts = _encode(lt, texts)
    _check_lengths(lt, [len(p) for p in prompts], gen.max_new_tokens, max_prompt_tokens)
    return _submit(lt, GenerateRequest(lt.adapter, prompts, gen, steering, tenant=tenant, deadline=deadline))


def generate_response(lt: LoadedTask, handle, out: dict) -> dict:
    steering = handle.request.steering
    return {
        "task": lt.task, "version": lt.version, "method": lt.method, "steering": _steering_info(steering),
        "results": [{"text": r.text, "token_ids": list(r.token_ids), "finish_reason": r.finish_reason}
                    for r in out["results"]],
        "usage": out["usage"],
    }


def run_generate(lt: LoadedTask, req: dict, max_prompt_tokens: int = 1024, **kw) -> dict:
    """Blocking generation (greedy, sampling or beams) through the base model's engine."""
    handle = submit_generate(lt, req, max_prompt_tokens, **kw)
    try:
        return generate_response(lt, handle, handle.result())
    except EngineError as exc:
        raise pool_error(exc) from None


# ------------------------------------------------------------------------------------------- score
def submit_score(lt: LoadedTask, req: dict, max_prompt_tokens: int = 1024, *, tenant: str = "default",
                 deadline: float | None = None):
    from svd_ray.decoding import encode_choices

    steering = _steering(lt, req.get("steering") or {})
    prompt, choices = req["prompt"], list(req["choices"])
    try:
        with lt.base.tokenizer_lock:
            prompt_ids, choice_ids = encode_choices(lt.tm.tokenizer, prompt, choices)
    except ValueError as exc:
        bad = next((i for i, c in enumerate(choices) if str(c) in str(exc)), None)
        raise InputError(str(exc), "body.choices" if bad is None else f"body.choices[{bad}]") from None
    _check_lengths(lt, [len(prompt_ids)], max(len(c) for c in choice_ids), max_prompt_tokens)
    outside = req.get("outside_mask", "unmasked")
    return _submit(lt, ScoreRequest(lt.adapter, prompt_ids, choice_ids, steering, outside, tenant=tenant,
                                    deadline=deadline))


def score_response(lt: LoadedTask, handle, scores, choices: list[str]) -> dict:
    r = handle.request
    probs = {w: scores.normalised(w) for w in ("steered", "adapter") + (("base",) if scores.base else ())}
    out = []
    for i, text in enumerate(choices):
        out.append({
            "index": i, "text": text, "num_tokens": scores.num_tokens[i],
            "outside_mask_tokens": scores.outside_mask_tokens[i],
            "loglik": {"steered": scores.steered[i], "adapter": scores.adapter[i],
                       "base": None if scores.base is None else scores.base[i]},
            "prob": {w: p[i] for w, p in probs.items()},
        })
    return {"task": lt.task, "version": lt.version, "method": lt.method, "steering": _steering_info(r.steering),
            "outside_mask": r.outside_mask, "choices": out,
            "usage": {"prompt_tokens": len(r.prompt), "choice_tokens": sum(scores.num_tokens)}}


def run_score(lt: LoadedTask, req: dict, max_prompt_tokens: int = 1024, **kw) -> dict:
    handle = submit_score(lt, req, max_prompt_tokens, **kw)
    try:
        return score_response(lt, handle, handle.result(), list(req["choices"]))
    except EngineError as exc:
        raise pool_error(exc) from None


# ------------------------------------------------------------------------------------------- stream
def stream_meta(lt: LoadedTask, handle) -> dict:
    return {"event": "meta", "task": lt.task, "version": lt.version, "method": lt.method,
            "steering": _steering_info(handle.request.steering)}


def stream_event(ev) -> dict:
    """An engine event as a stream event: ``token`` {index, text, token_id} per releasable piece, ``end``
    {index, finish_reason, num_tokens} per prompt, ``usage`` last, or ``error``."""
    if ev.kind == "token":
        return {"event": "token", "index": ev.index, "text": ev.text, "token_id": ev.token_id}
    if ev.kind == "end":
        return {"event": "end", "index": ev.index, "finish_reason": ev.finish_reason, "num_tokens": ev.num_tokens}
    if ev.kind == "done":
        return {"event": "usage", **ev.result["usage"]}
    return {"event": "error", "error": pool_error(ev.error).to_dict()}


def run_stream(lt: LoadedTask, req: dict, emit: Callable[[dict], None], cancelled: Callable[[], bool],
               max_prompt_tokens: int = 1024, **kw) -> None:
    """Blocking streaming generation: ``meta`` then one ``emit`` per event; stops the work when ``cancelled()``."""
    if int(req["gen"].get("num_beams", 1)) > 1:
        raise InputError("num_beams > 1 cannot be streamed", "body.num_beams")
    handle = submit_generate(lt, req, max_prompt_tokens, **kw)
    emit(stream_meta(lt, handle))
    while True:
        if cancelled():
            handle.cancel()
            return
        try:
            ev = handle.events.get(timeout=0.05)
        except queue.Empty:
            continue
        emit(stream_event(ev))
        if ev.kind in ("done", "error"):
            return
