"""The model replica's request handlers: validated request → engine request → response body.

Prompts are tokenised once, here; the engine (``svd_ray.batching``) does all model work on its own
thread, batched with every other request on the same base model. ``submit_*`` return the engine's
``RequestHandle`` (the async deployment awaits it and cancels it when the client goes away);
``run_*`` are the blocking forms (tests, scripts).
"""
from __future__ import annotations

import queue
import time
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
def _prompt_ids(lt: LoadedTask, req: dict) -> tuple[list[list[int]], list[str] | None]:
    """Token ids of the request's prompts (encoded here once; token-id prompts checked against the vocabulary)
    and their texts (None for token-id prompts: decoded only when echoed)."""
    if req.get("messages") is not None:
        texts = [render_chat(lt, req["messages"])]
    elif req.get("prompt_ids") is not None:
        vocab = _vocab_size(lt)
        ids = [list(map(int, p)) for p in req["prompt_ids"]]
        for i, p in enumerate(ids):
            bad = next((t for t in p if not 0 <= t < vocab), None)
            if bad is not None:
                where = "body.prompt" if len(ids) == 1 else f"body.prompt[{i}]"
                raise InputError(f"token id {bad} is outside the vocabulary (0..{vocab - 1})", where)
        return ids, None
    else:
        texts = list(req["prompts"])
    return _encode(lt, texts), texts


def _vocab_size(lt: LoadedTask) -> int:
    cfg = lt.engine.bank.config
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    return int(getattr(cfg, "vocab_size", None) or len(lt.tm.tokenizer))


def submit_generate(lt: LoadedTask, req: dict, max_prompt_tokens: int = 1024, *, tenant: str = "default",
                    deadline: float | None = None):
    """The engine handle of a generation (``n`` copies per prompt, optional logprobs), or with ``echo`` a
    ``CompletionHandle`` that also scores the prompts' own tokens (for their logprobs) through the engine's
    bounded, merged scoring path."""
    tok = lt.tm.tokenizer
    eos = (tok.eos_token_id,) if tok.eos_token_id is not None else ()
    steering = _steering(lt, req.get("steering") or {})
    prompts, texts = _prompt_ids(lt, req)
    max_new = int(req["gen"]["max_new_tokens"])
    _check_lengths(lt, [len(p) for p in prompts], max_new, max_prompt_tokens)
    n = max(1, int(req.get("n", 1)))
    logprobs = req.get("logprobs")
    outside = req.get("outside_mask", "unmasked")
    echo = bool(req.get("echo"))
    if max_new < 1 and not echo:
        raise InputError("max_tokens 0 needs echo", "body.max_tokens")
    scoring: list = []
    try:
        if echo and logprobs is not None:  # the prompt tokens' own log-probs: teacher-forced, chunked, bounded
            for i, p in enumerate(prompts):
                scoring.append(None if len(p) < 2 else _submit_prompt_score(
                    lt, p, steering, outside, int(logprobs), tenant, deadline,
                    "body.prompt" if len(prompts) == 1 else f"body.prompt[{i}]"))
        gen = None
        if max_new > 0:
            gen = _submit(lt, GenerateRequest(
                lt.adapter, prompts, _gen_config(req["gen"], eos), steering, tenant=tenant, deadline=deadline,
                logprobs=None if logprobs is None else int(logprobs), outside_mask=outside, copies=n))
    except BaseException:
        for h in scoring:
            if h is not None:
                h.cancel()
        raise
    if not echo:
        return gen
    return CompletionHandle(prompts, texts, n, logprobs, steering, gen, scoring)


def _submit_prompt_score(lt, prompt, steering, outside, top, tenant, deadline, field):
    """Score tokens 1.. of ``prompt`` given their prefixes (a one-choice score request: prompt[:1], choice
    prompt[1:]); a request that can never fit is refused naming the prompt."""
    req = ScoreRequest(lt.adapter, prompt[:1], [prompt[1:]], steering, outside, tenant=tenant, deadline=deadline,
                       top_logprobs=top)
    try:
        return lt.engine.submit(req)
    except EngineError as exc:
        err = pool_error(exc)
        err.field = field if exc.field is not None else None
        raise err from None


class CompletionHandle:
    """A completion with ``echo``: the generation (if ``max_tokens`` > 0) and one prompt-scoring request per
    prompt (with ``logprobs``), awaited and cancelled together. Quacks like ``RequestHandle`` for the replica."""

    def __init__(self, prompts, texts, n, logprobs, steering, gen, scoring):
        self.prompts, self.texts, self.n, self.logprobs = prompts, texts, n, logprobs
        self.steering, self.gen, self.scoring = steering, gen, scoring
        self.parts = [h for h in [gen, *scoring] if h is not None]
        self.submitted_at = min((h.submitted_at for h in self.parts), default=time.monotonic())

    @property
    def first_token_at(self):
        return None if self.gen is None else self.gen.first_token_at

    def cancel(self) -> None:
        for h in self.parts:
            h.cancel()

    def result(self, timeout: float | None = None) -> dict:
        try:
            echo = [None if h is None else h.result(timeout) for h in self.scoring]
            return {"gen": None if self.gen is None else self.gen.result(timeout), "echo": echo}
        except BaseException:
            self.cancel()
            raise


def _token_strings(lt: LoadedTask, ids: list[int]) -> list[str]:
    with lt.base.tokenizer_lock:
        return [lt.tm.tokenizer.decode([i], skip_special_tokens=False) for i in ids]


def _logprob_block(lt: LoadedTask, entries: list[tuple[int, float | None, list | None]], offset: int) -> dict:
    """OpenAI's legacy ``logprobs`` object for tokens ``entries`` = (id, logprob or None, top [(id, lp)] or
    None): ``tokens``, ``token_logprobs``, ``top_logprobs`` (the top alternatives plus the token itself, as
    OpenAI does), ``text_offset`` (character offsets, starting at ``offset``, of each token's text)."""
    ids = [e[0] for e in entries]
    alt = sorted({i for e in entries for i, _ in (e[2] or [])} - set(ids))
    strings = dict(zip(ids + alt, _token_strings(lt, ids + alt)))
    tokens, lps, tops, offsets = [], [], [], []
    for tid, lp, top in entries:
        tokens.append(strings[tid])
        lps.append(lp)
        offsets.append(offset)
        offset += len(strings[tid])
        if top is None:
            tops.append(None)
            continue
        d: dict[str, float] = {}
        for i, v in top:
            d.setdefault(strings[i], v)
        d.setdefault(strings[tid], lp)
        tops.append(d)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def generate_response(lt: LoadedTask, handle, out: dict) -> dict:
    if isinstance(handle, CompletionHandle):
        return _echo_response(lt, handle, out)
    steering = handle.request.steering
    lps = out.get("logprobs")
    results = []
    for k, r in enumerate(out["results"]):
        res = {"text": r.text, "token_ids": list(r.token_ids), "finish_reason": r.finish_reason}
        if lps is not None:  # offsets continue the prompt's text (OpenAI's convention without echo)
            start = len(_prompt_text(lt, handle.request.prompts[k // max(1, handle.request.copies)]))
            res["logprobs"] = _logprob_block(lt, lps[k], start)
        results.append(res)
    return {
        "task": lt.task, "version": lt.version, "method": lt.method, "steering": _steering_info(steering),
        "results": results, "usage": out["usage"],
    }


def _prompt_text(lt: LoadedTask, ids: list[int]) -> str:
    with lt.base.tokenizer_lock:
        return lt.tm.tokenizer.decode(ids, skip_special_tokens=False)


def _echo_response(lt: LoadedTask, h: CompletionHandle, out: dict) -> dict:
    """Each choice's text starts with its prompt (the prompt string as sent, or the decoded token ids); with
    ``logprobs`` its ``logprobs`` start with the prompt's tokens (the first one has no log-prob)."""
    gen = out["gen"]
    results = []
    for k in range(len(h.prompts) * h.n):
        p = k // h.n
        prompt = h.prompts[p]
        text = h.texts[p] if h.texts is not None else _prompt_text(lt, prompt)
        r = gen["results"][k] if gen is not None else None
        res = {"text": r.text if r else "", "token_ids": list(r.token_ids) if r else [],
               "finish_reason": r.finish_reason if r else "length", "prompt_text": text}
        if h.logprobs is not None:
            entries = [(prompt[0], None, None)]
            sc = out["echo"][p]
            if sc is not None:
                tops = sc.top_logprobs[0] if sc.top_logprobs is not None else [[] for _ in prompt[1:]]
                entries += [(t, lp, top) for t, lp, top in zip(prompt[1:], sc.token_logprobs[0], tops)]
            if gen is not None:
                entries += gen["logprobs"][k]
            res["logprobs"] = _logprob_block(lt, entries, 0)
        results.append(res)
    usage = {"prompt_tokens": sum(len(p) for p in h.prompts),
             "completion_tokens": 0 if gen is None else gen["usage"]["completion_tokens"]}
    return {"task": lt.task, "version": lt.version, "method": lt.method, "steering": _steering_info(h.steering),
            "results": results, "usage": usage}


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
