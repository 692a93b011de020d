"""The batching engine: continuous batching of steered decoding over many tasks on one base model.

One engine per base model per replica; pure torch + transformers (no Ray), driven by one thread.
Each iteration, at a token boundary:

  1. intake   new requests go to their tenant's queue; adapter (un)registrations run here, on the
              engine thread, between forwards;
  2. reap     requests whose client cancelled or whose deadline passed leave: their rows are dropped
              from the batch at once, so the work stops, not only the response;
  3. admit    queued requests are admitted round-robin over tenants while the reserved rows and KV
              tokens (rows × (virtual + prompt + max_new)) fit the budget (``EngineConfig``);
  4. side     prefill and other non-decode work, about ``step_token_budget`` positions (rows × tokens)
              per kind of work per iteration: new short prompts of any tasks are prefilled together in
              one forward; long prompts are prefilled in chunks; the next forwards of all scoring
              requests run merged into one forward (rows of different requests side by side); beam
              search advances one step — round-robin over tenants, so a heavy request slows the others
              by a bounded amount per token, never blocks them;
  5. decode   one forward over every running row: rows of different tasks and methods, and each
              steered sequence's adapter-on and adapter-off rows (``AdapterBank`` slot −1), together.
              Then ẑ is formed per row (``steering.form_steered_logits`` with per-row μ, α), tokens are
              chosen with each request's own sampling parameters and seeded generator, and sequences
              that finish (EOS, length, stop string) leave the batch.

A greedy request therefore decodes token for token what it decodes alone (tests check this across
mixed, joining and leaving batches). Static and ``off`` steering take no adapter-off row.
"""
from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, replace

import torch

from svd_ray.batching.adapters import AdapterBank
from svd_ray.batching.fused import FusedDual
from svd_ray.batching.requests import (
    Adapter,
    Cancelled,
    DeadlineExceeded,
    EngineError,
    EngineStopped,
    Event,
    GenerateRequest,
    InvalidRequest,
    RequestHandle,
    RequestTooLarge,
    ScoreRequest,
)
from svd_ray.batching.rows import RowBatch, RowSpec, extend, prefill, step
from svd_ray.batching.text import TextTracker
from svd_ray.decoding.generate import GenerationResult, iter_beam_search, sampling_logits
from svd_ray.batching.scoring import ScoreJob, run_plans
from svd_ray.decoding.scoring import steered_logprobs, top_logprobs
from svd_ray.steering import form_steered_logits

log = logging.getLogger("svd_ray.batching")


SHUTTING_DOWN = "the model replica is shutting down; retry the request"


@dataclass
class EngineConfig:
    """Budgets of one engine (one base model in one replica). Defaults fit SmolLM2-135M on 2 CPU cores."""

    max_rows: int = 32  # rows decoded together (a steered sequence takes 2, a beam 1 per beam and branch)
    max_kv_tokens: int = 65536  # KV cache entries reserved by admitted work (≈ 3.0 GB for SmolLM2 fp32: docs/SERVING.md §4)
    prefill_chunk: int = 64  # at most this many tokens per row in one prefill / scoring forward
    step_token_budget: int = 32  # prefill / scoring positions (rows × tokens) between two decode steps
    score_max_rows: int = 8  # rows per scoring forward (a choice takes 2)
    max_blocked_s: float = 5.0  # a queued request this old stops admission of others until it fits
    max_positions: int | None = None  # the model's context (virtual tokens included); None = unchecked
    retire_grace_s: float = 2.0  # a removed adapter stays usable this long (requests that already hold it)

    def __post_init__(self) -> None:
        for name in ("max_rows", "max_kv_tokens", "prefill_chunk", "step_token_budget", "score_max_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"engine.{name} must be ≥ 1")
        if self.score_max_rows < 2:
            raise ValueError("engine.score_max_rows must be ≥ 2 (a choice takes an adapter-on and -off row)")


def sliding_window_of(config) -> int | None:
    """The sliding window of a model whose layers include sliding-window attention, else None."""
    text = getattr(config, "get_text_config", lambda: config)()
    window = getattr(text, "sliding_window", None)
    kinds = getattr(text, "layer_types", None) or []
    if window and (not kinds or any(k != "full_attention" for k in kinds)):
        return int(window)
    return None


class _Work:
    """An accepted request and its progress."""

    _ids = itertools.count()

    def __init__(self, handle: RequestHandle, rows: int, kv: int):
        self.id = next(self._ids)
        self.handle, self.req = handle, handle.request
        self.tenant = self.req.tenant
        self.rows, self.kv = rows, kv
        self.seqs: list[_Seq] = []
        self.job = None  # generator (beam search)
        self.score = None  # ScoreJob
        self.done = False


class _Seq:
    """One prompt of a greedy / sampled generate request."""

    def __init__(self, work: _Work, index: int, prompt: list[int], decode):
        req: GenerateRequest = work.req
        self.work, self.index, self.prompt = work, index, prompt
        self.gen, self.steering, self.slot = req.gen, req.steering, req.adapter.slot
        self.paired = req.steering.needs_base
        self.mean_delta = req.adapter.mean_delta
        self.tracker = TextTracker(decode, req.gen.stop_strings)
        self.generator = None
        if req.gen.do_sample:
            self.generator = torch.Generator(device="cpu")
            seed = req.gen.seed + index if req.gen.seed is not None else int(torch.randint(0, 2**62, (1,)))
            self.generator.manual_seed(seed)
        self.consumed = 0  # prompt tokens prefilled
        self.staged: RowBatch | None = None  # cache while a long prompt is prefilled in chunks
        self.last_token: int | None = None
        self.finish_reason: str | None = None
        self.text = ""
        # (token id, log p, top alternatives) of every chosen token when the request asked for logprobs
        self.want_lp, self.outside = req.logprobs, req.outside_mask
        self.lp: list[tuple[int, float, list]] = []

    def specs(self, tokens: list[int]) -> list[RowSpec]:
        return [RowSpec(self.slot, tokens)] + ([RowSpec(-1, tokens)] if self.paired else [])

    @property
    def n_rows(self) -> int:
        return 2 if self.paired else 1


class Engine:
    def __init__(self, bank: AdapterBank, tokenizer, config: EngineConfig | None = None, tokenizer_lock=None):
        self.bank = bank
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        window = sliding_window_of(bank.config)
        if window is not None:
            # Sliding-window layers mask by cache column; with padding in the cache, columns are not token
            # distances. While every row fits in the window nothing is ever cut, so attention is exactly
            # full attention: cap the context at the window (longer requests are refused with 413).
            cap = window if self.config.max_positions is None else min(window, self.config.max_positions)
            self.config = replace(self.config, max_positions=cap)
        lock = tokenizer_lock or threading.Lock()  # the tokenizer may be shared with request threads

        def decode(ids: list[int]) -> str:
            with lock:
                return tokenizer.decode(ids, skip_special_tokens=True)

        self._decode = decode
        self.eos_ids = tuple(i for i in [getattr(tokenizer, "eos_token_id", None)] if i is not None)
        self._cv = threading.Condition()
        self._inbox: collections.deque = collections.deque()
        self._calls: collections.deque = collections.deque()
        self._queues: dict[str, collections.deque[_Work]] = collections.OrderedDict()
        self._active: list[_Work] = []
        self._prefilling: list[_Seq] = []
        self._batch = RowBatch.empty(bank.device)
        self._rows: list[tuple[_Seq, bool]] = []  # batch row → (sequence, is adapter-off row)
        self._rr = 0
        self._retired: dict[int, float] = {}  # slot → when it was removed
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._budget = self.config.step_token_budget  # side-work positions of the current iteration
        self.stats = collections.Counter()

    # ------------------------------------------------------------------ public API (any thread)
    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="svd-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping = True
        self.wake()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._fail_all(EngineStopped(SHUTTING_DOWN))

    def wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def _on_engine_thread(self, fn):
        """Run ``fn`` between two forwards (on the engine thread when it runs) and return its value."""
        if self._thread is None or threading.current_thread() is self._thread:
            return fn()
        if self._stopping or not self._thread.is_alive():  # nobody would ever run it
            raise EngineStopped(SHUTTING_DOWN)
        fut: Future = Future()
        self._calls.append((fn, fut))
        self.wake()
        return fut.result(timeout=120)

    def add_adapter(self, key: str, peft_model, mean_delta: torch.Tensor | None = None) -> Adapter:
        """Register a task's adapter; requests name the returned ``Adapter``."""
        def register():
            entry = self.bank.register(peft_model)
            md = None if mean_delta is None else mean_delta.to(self.bank.device)
            return Adapter(key, entry.slot, entry.method, entry.num_virtual, md)
        return self._on_engine_thread(register)

    def remove_adapter(self, adapter: Adapter) -> None:
        """Forget the adapter once no admitted or queued request uses it (requests holding it finish)."""
        self._on_engine_thread(lambda: self._retired.setdefault(adapter.slot, time.monotonic()))

    def submit(self, request: GenerateRequest | ScoreRequest) -> RequestHandle:
        """Queue a request (refused up front, ``RequestTooLarge`` naming the field, if it can never fit)."""
        if self._stopping:
            raise EngineStopped(SHUTTING_DOWN)
        if request.adapter.slot not in self.bank.entries:
            raise EngineStopped("the task was unloaded; retry the request")
        if isinstance(request, GenerateRequest) and request.gen.num_beams > 1 and (
                request.copies > 1 or request.logprobs is not None):
            raise InvalidRequest("beam search returns one sequence per prompt, without logprobs", "num_beams")
        rows, kv = self._cost(request)
        handle = RequestHandle(request, self.wake)
        with self._cv:
            self._inbox.append(_Work(handle, rows, kv))
            self._cv.notify_all()
        return handle

    def snapshot(self) -> dict:
        """Gauges for metrics (read without locking: approximate by design)."""
        return {
            "running_rows": len(self._rows),
            "running_sequences": len({id(s) for s, _ in self._rows}),
            "prefilling": len(self._prefilling),
            "queued": sum(len(q) for q in self._queues.values()) + len(self._inbox),
            "active_requests": len(self._active),
            "reserved_kv_tokens": sum(w.kv for w in self._active),
            "kv_width": self._batch.width,
            **self.stats,
        }

    # ------------------------------------------------------------------ admission control
    def _cost(self, request) -> tuple[int, int]:
        c = self.config
        if isinstance(request, ScoreRequest):
            total = request.adapter.num_virtual + len(request.prompt) + max(len(x) for x in request.choices)
            if c.max_positions and total > c.max_positions:
                raise RequestTooLarge(f"prompt + longest choice is {total} tokens; the model's context is "
                                      f"{c.max_positions}", "choices")
            rows = min(c.score_max_rows, 2 * len(request.choices))
            kv = request.kv_tokens(c.score_max_rows)
            if kv > c.max_kv_tokens:
                raise RequestTooLarge(f"prompt + longest choice needs {kv} KV entries; the limit is "
                                      f"{c.max_kv_tokens}", "choices")
            return rows, kv
        longest = max(len(p) for p in request.prompts)
        total = request.adapter.num_virtual + longest + request.gen.max_new_tokens
        if c.max_positions and total > c.max_positions:
            raise RequestTooLarge(f"prompt ({longest} tokens) + max_new_tokens ({request.gen.max_new_tokens}) "
                                  f"exceeds the model's context of {c.max_positions - request.adapter.num_virtual} "
                                  "tokens", "max_new_tokens")
        rows, kv = request.rows(), request.kv_tokens()
        if rows > c.max_rows:
            field = "num_beams" if request.gen.num_beams > 1 else "n" if request.copies > 1 else "prompt"
            raise RequestTooLarge(f"the request needs {rows} decoding rows (prompts × n × beams × branches); the "
                                  f"limit is {c.max_rows}", field)
        if kv > c.max_kv_tokens:
            raise RequestTooLarge(f"the request reserves {kv} KV entries (rows × (prompt + max_new_tokens)); "
                                  f"the limit is {c.max_kv_tokens}", "max_new_tokens")
        return rows, kv

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while not self._stopping:
            try:
                did = self.run_once()
            except Exception:  # a bug must not kill the replica: fail what was running, keep serving
                log.exception("engine iteration failed")
                self._fail_all(EngineError("model error"))
                did = True
            if not did:
                with self._cv:
                    if not self._inbox and not self._calls and not self._stopping:
                        self._cv.wait(timeout=0.5)

    def run_once(self) -> bool:
        """One iteration (see the module docstring). Returns whether any work was done."""
        self._intake()
        self._reap()
        self._admit()
        did = self._side_work()
        did = self._decode_step() or did
        self._collect_retired()
        return did

    def idle(self) -> bool:
        return not (self._inbox or self._active or any(self._queues.values()))

    def run_until_idle(self, max_iterations: int = 100000) -> None:
        """Drive the engine on this thread (tests, benchmarks without the background thread)."""
        for _ in range(max_iterations):
            if self.idle():
                return
            self.run_once()
        raise RuntimeError("engine did not become idle")

    # ------------------------------------------------------------------ 1. intake
    def _intake(self) -> None:
        while self._calls:
            fn, fut = self._calls.popleft()
            try:
                fut.set_result(fn())
            except BaseException as exc:  # reported to the caller
                fut.set_exception(exc)
        with self._cv:
            new = list(self._inbox)
            self._inbox.clear()
        for w in new:
            self._queues.setdefault(w.tenant, collections.deque()).append(w)

    # ------------------------------------------------------------------ 2. reap
    def _expired(self, w: _Work) -> EngineError | None:
        if w.handle.cancelled:
            return Cancelled("the request was cancelled")
        if w.req.deadline is not None and time.monotonic() > w.req.deadline:
            return DeadlineExceeded("the request's deadline passed")
        return None

    def _reap(self) -> None:
        for q in self._queues.values():
            for w in [w for w in q if self._expired(w)]:
                q.remove(w)
                self._finish(w, error=self._expired(w))
        for w in list(self._active):
            err = self._expired(w)
            if err is not None:
                self._finish(w, error=err)
                self.stats["cancelled" if isinstance(err, Cancelled) else "deadline_exceeded"] += 1

    # ------------------------------------------------------------------ 3. admit
    def _admit(self) -> None:
        c = self.config
        tenants = [t for t, q in self._queues.items() if q]
        if not tenants:
            return
        used_rows = sum(w.rows for w in self._active)
        used_kv = sum(w.kv for w in self._active)
        now = time.monotonic()
        oldest = min((q[0] for q in self._queues.values() if q), key=lambda w: w.handle.submitted_at)
        starving = now - oldest.handle.submitted_at > c.max_blocked_s
        start = self._rr % len(tenants)
        progressed = True
        while progressed:
            progressed = False
            for t in tenants[start:] + tenants[:start]:
                q = self._queues[t]
                if not q:
                    continue
                w = q[0]
                if starving and w is not oldest:
                    continue  # the request waiting longest goes first once it has waited max_blocked_s
                if used_rows + w.rows > c.max_rows or used_kv + w.kv > c.max_kv_tokens:
                    continue
                q.popleft()
                used_rows += w.rows
                used_kv += w.kv
                self._activate(w)
                progressed = True
                if starving and w is oldest:
                    starving = False
        self._rr += 1
        for t in [t for t, q in self._queues.items() if not q]:
            del self._queues[t]

    def _activate(self, w: _Work) -> None:
        self._active.append(w)
        req = w.req
        if isinstance(req, ScoreRequest):
            w.score = ScoreJob(req, max_rows=self.config.score_max_rows, chunk=self.config.prefill_chunk,
                               device=self.bank.device, token_budget=self.config.step_token_budget)
        elif req.gen.num_beams > 1:
            gen = replace(req.gen, eos_token_ids=req.gen.eos_token_ids or self.eos_ids)
            w.job = self._beam_job(w, gen)
        else:
            c = max(1, req.copies)
            w.seqs = [_Seq(w, i * c + j, p, self._decode) for i, p in enumerate(req.prompts) for j in range(c)]
            self._prefilling += w.seqs

    def _beam_job(self, w: _Work, gen):
        req: GenerateRequest = w.req
        width = max(len(p) for p in req.prompts)
        ids = torch.zeros(len(req.prompts), width, dtype=torch.long, device=self.bank.device)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(req.prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        results = yield from iter_beam_search(FusedDual(self.bank, req.adapter.slot), ids, mask, req.steering, gen)
        for r in results:
            text = self._decode(r.token_ids)
            cuts = [c for c in (text.find(x) for x in gen.stop_strings if x) if c >= 0]
            r.text, r.finish_reason = (text[: min(cuts)], "stop") if cuts else (text, r.finish_reason)
        return results

    # ------------------------------------------------------------------ 4. side work
    def _side_work(self) -> bool:
        c = self.config
        # With other requests waiting or decoding, side work is bounded so their tokens keep flowing; a
        # request alone in the engine may use its full chunks (nobody to be fair to).
        alone = not self._rows and len(self._active) <= 1 and not any(self._queues.values())
        budget = c.step_token_budget * (8 if alone else 1)
        self._budget = budget
        did = False
        # (a) new prompts of any tasks: their first chunks in ONE forward. New short prompts arrive with real
        # load and are fair between tenants, so they get 8× the budget; a long prompt's later chunks do not.
        fresh = [s for s in self._tenant_fair(self._prefilling) if s.consumed == 0 and s.staged is None]
        group, tokens = [], 0
        self._budget = 8 * c.step_token_budget
        for s in fresh:
            n = min(self._chunk(s.n_rows), len(s.prompt)) * s.n_rows
            if group and tokens + n > self._budget:
                break
            group.append(s)
            tokens += n
        if group:
            self._prefill_group(group)
            did = True
        self._budget = budget
        # (b) scoring: the next forward of every score request, merged across requests (≤ score_max_rows rows)
        scoring = self._tenant_fair([w for w in self._active if w.score is not None])
        if scoring:
            budget -= self._score_step(scoring)
            did = True
        # (c) long prompts' later chunks and beam steps: one step each, round-robin, at least one
        units = [s for s in self._prefilling if s.staged is not None] + [w for w in self._active if w.job is not None]
        units = self._tenant_fair(units)
        for k, u in enumerate(units):
            if k and budget <= 0:
                break
            if isinstance(u, _Seq):
                budget -= self._prefill_continue(u)
            else:
                budget -= self._job_step(u)
            did = True
        return did

    def _score_step(self, works: list[_Work]) -> int:
        plans, rows = [], 0
        for w in works:
            try:
                plan = w.score.plan(self._budget)
            except Exception:
                log.exception("request %s failed", w.id)
                self._finish(w, error=EngineError("model error"))
                continue
            if plan is None:
                self._finish(w, result=w.score.result())
                continue
            if plans and rows + plan.rows > self.config.score_max_rows:
                w.score.pending = plan  # keep it for the next iteration (plan() already advanced the job)
                continue
            plans.append(plan)
            rows += plan.rows
        if not plans:
            return 0
        with torch.inference_mode():
            n = run_plans(self.bank, plans)
        self.stats["score_forwards"] += 1
        self.stats["score_plans"] += len(plans)
        return n

    def _chunk(self, rows: int) -> int:
        """Tokens per row of one side forward: ≤ prefill_chunk, and rows × tokens ≤ this iteration's budget."""
        c = self.config
        budget = self._budget
        return max(1, min(c.prefill_chunk, budget // max(1, rows)))

    def _tenant_fair(self, items: list) -> list:
        """Interleave items by tenant (first item of each tenant, then the second…), rotating the start."""
        by: dict[str, list] = collections.OrderedDict()
        for it in items:
            w = it.work if isinstance(it, _Seq) else it
            by.setdefault(w.tenant, []).append(it)
        lanes = list(by.values())
        if not lanes:
            return []
        r = self._rr % len(lanes)
        lanes = lanes[r:] + lanes[:r]
        out = []
        for i in range(max(len(l) for l in lanes)):
            out += [l[i] for l in lanes if i < len(l)]
        return out

    def _prefill_group(self, group: list[_Seq]) -> None:
        c = self.config
        specs, spans = [], []
        for s in group:
            chunk = s.prompt[: self._chunk(s.n_rows)]
            spans.append((len(specs), s.n_rows))
            specs += s.specs(chunk)
            s.consumed = len(chunk)
        with torch.inference_mode():
            batch, logits = prefill(self.bank, specs, last_only=True)
        self.stats["prefill_forwards"] += 1
        self.stats["prefill_tokens"] += sum(len(sp.tokens) for sp in specs)
        done_seqs, done_rows = [], []
        for s, (start, n) in zip(group, spans):
            if s.consumed < len(s.prompt):
                s.staged = batch.select(torch.arange(start, start + n, device=self.bank.device))
            else:
                done_seqs.append(s)
                done_rows.append((start, n))
        if done_seqs:
            z = logits[:, -1]
            on = torch.tensor([st for st, _ in done_rows], device=z.device)
            off = torch.tensor([st + 1 if s.paired else st for s, (st, _) in zip(done_seqs, done_rows)], device=z.device)
            idx = torch.cat([torch.arange(st, st + n) for st, n in done_rows]).to(z.device)
            self._first_tokens(done_seqs, z[on], z[off], batch.select(idx))

    def _prefill_continue(self, s: _Seq) -> int:
        c = self.config
        chunk = s.prompt[s.consumed: s.consumed + self._chunk(s.n_rows)]
        tokens = torch.tensor([chunk] * s.n_rows, device=self.bank.device)
        with torch.inference_mode():
            logits = extend(self.bank, s.staged, tokens, last_only=True)[:, -1]
        s.consumed += len(chunk)
        self.stats["prefill_forwards"] += 1
        self.stats["prefill_tokens"] += len(chunk) * s.n_rows
        if s.consumed >= len(s.prompt):
            staged, s.staged = s.staged, None
            self._first_tokens([s], logits[:1], logits[1:2] if s.paired else logits[:1], staged)
        return len(chunk) * s.n_rows

    def _job_step(self, w: _Work) -> int:
        try:
            with torch.inference_mode():
                next(w.job)
        except StopIteration as end:
            result = end.value
            if isinstance(w.req, GenerateRequest):
                result = self._gen_result(w, result)
            self._finish(w, result=result)
        except Exception:  # this request's bug, not the batch's: fail it alone
            log.exception("request %s failed", w.id)
            w.job = None
            self._finish(w, error=EngineError("model error"))
        return self.config.prefill_chunk

    def _first_tokens(self, seqs: list[_Seq], z_on, z_off, batch: RowBatch) -> None:
        """Prompts fully encoded: choose their first tokens; the unfinished ones join the decode batch."""
        for s in seqs:
            self._prefilling.remove(s)
        self._choose(seqs, z_on, z_off)
        keep = []
        row = 0
        for s in seqs:
            if s.finish_reason is None:
                keep += list(range(row, row + s.n_rows))
            row += s.n_rows
        if keep:
            joined = batch.select(torch.tensor(keep, device=self.bank.device)) if len(keep) < len(batch) else batch
            self._batch = RowBatch.concat(self._batch, joined)
            for s in seqs:
                if s.finish_reason is None:
                    self._rows.append((s, False))
                    if s.paired:
                        self._rows.append((s, True))

    # ------------------------------------------------------------------ 5. decode
    def _decode_step(self) -> bool:
        if not self._rows:
            return False
        dev = self.bank.device
        tokens = torch.tensor([s.last_token for s, _ in self._rows], device=dev)
        with torch.inference_mode():
            logits = step(self.bank, self._batch, tokens)
        self.stats["decode_steps"] += 1
        self.stats["decode_rows"] += len(self._rows)
        seqs, on, off = [], [], []
        for r, (s, is_base) in enumerate(self._rows):
            if not is_base:
                seqs.append(s)
                on.append(r)
                off.append(r + 1 if s.paired else r)
        self._choose(seqs, logits[on], logits[off])
        if any(s.finish_reason is not None for s in seqs):
            self._drop_rows(lambda s: s.finish_reason is not None)
        return True

    def _drop_rows(self, gone) -> None:
        keep = [r for r, (s, _) in enumerate(self._rows) if not gone(s)]
        self._rows = [self._rows[r] for r in keep]
        self._batch = self._batch.select(torch.tensor(keep, dtype=torch.long, device=self.bank.device))

    def _choose(self, seqs: list[_Seq], z_on: torch.Tensor, z_off: torch.Tensor) -> None:
        """ẑ per sequence (its own mode, μ, α), then its own token choice; emit and finish."""
        steered = torch.empty(z_on.shape, dtype=torch.float32, device=z_on.device)
        for mode in ("svdecode", "static", "off"):
            idx = [i for i, s in enumerate(seqs) if s.steering.mode == mode]
            if not idx:
                continue
            it = torch.tensor(idx, device=z_on.device)
            mu = torch.tensor([float(seqs[i].steering.mu) for i in idx], device=z_on.device)
            alpha = torch.tensor([float(seqs[i].steering.alpha) for i in idx], device=z_on.device)
            md = None
            if mode == "static":
                md = torch.stack([seqs[i].steering.mean_delta if seqs[i].steering.mean_delta is not None
                                  else seqs[i].mean_delta for i in idx]).to(z_on.device)
            steered[it] = form_steered_logits(z_on[it], z_off[it] if mode == "svdecode" else None, mode=mode,
                                              mu=mu, alpha=alpha, mean_delta=md).float()
        for i, s in enumerate(seqs):
            if len(s.tracker.ids) < s.gen.min_new_tokens:
                steered[i, list(s.gen.eos_token_ids or self.eos_ids)] = float("-inf")
        greedy = steered.argmax(-1).tolist()
        for i, s in enumerate(seqs):
            if s.gen.do_sample:
                probs = torch.softmax(sampling_logits(steered[i:i + 1], s.gen.temperature, s.gen.top_k, s.gen.top_p), -1)
                tok = int(torch.multinomial(probs.cpu(), 1, generator=s.generator))
            else:
                tok = greedy[i]
            if s.want_lp is not None:
                s.lp.append(self._logprob(s, z_on[i:i + 1], z_off[i:i + 1], tok))
            self._accept(s, tok)

    @staticmethod
    def _logprob(s: _Seq, z_on: torch.Tensor, z_off: torch.Tensor, tok: int) -> tuple[int, float, list]:
        """log p̂ of the chosen token and the ``want_lp`` most likely ones: the same ẑ the token was chosen from
        (``form_steered_logits``), normalised as the request's mask policy says (before temperature / top-k /
        top-p, like OpenAI's logprobs)."""
        logp, _ = steered_logprobs(z_on, z_off if s.steering.mode == "svdecode" else None, s.steering, s.outside)
        row = logp[0]
        return tok, float(row[tok]), (top_logprobs(row, s.want_lp) if s.want_lp > 0 else [])

    def _accept(self, s: _Seq, tok: int) -> None:
        h = s.work.handle
        if h.first_token_at is None:
            h.first_token_at = time.monotonic()
            self.stats["first_tokens"] += 1
        self.stats["tokens_out"] += 1
        eos = s.gen.eos_token_ids or self.eos_ids
        if tok in eos:
            return self._end_seq(s, "eos")
        piece, stopped = s.tracker.add(tok)
        s.last_token = tok
        if piece:
            h.events.put(Event("token", index=s.index, text=piece, token_id=tok))
        if stopped:
            s.tracker.ids.pop()  # token_ids end before the token that completed the stop string
            return self._end_seq(s, "stop")
        if len(s.tracker.ids) >= s.gen.max_new_tokens:
            return self._end_seq(s, "length")

    def _end_seq(self, s: _Seq, reason: str) -> None:
        s.finish_reason = reason
        rest, s.text = ("", s.tracker.sent) if reason == "stop" else s.tracker.finish()
        h = s.work.handle
        if rest:
            h.events.put(Event("token", index=s.index, text=rest, token_id=None))
        h.events.put(Event("end", index=s.index, finish_reason=reason, num_tokens=len(s.tracker.ids)))
        w = s.work
        if all(x.finish_reason is not None for x in w.seqs):
            results = [GenerationResult(list(x.tracker.ids), x.finish_reason, x.text) for x in w.seqs]
            self._finish(w, result=self._gen_result(w, results))

    def _gen_result(self, w: _Work, results: list[GenerationResult]) -> dict:
        out = {"results": results, "usage": {"prompt_tokens": sum(len(p) for p in w.req.prompts),
                                             "completion_tokens": sum(len(r.token_ids) for r in results)}}
        if w.seqs and w.req.logprobs is not None:
            out["logprobs"] = [s.lp for s in w.seqs]  # per prompt: every chosen token, EOS / stop token included
        return out

    # ------------------------------------------------------------------ endings
    def _finish(self, w: _Work, *, result=None, error: EngineError | None = None) -> None:
        if w.done:
            return
        w.done = True
        if w in self._active:
            self._active.remove(w)
        if w.job is not None:
            w.job.close()
            w.job = None
        w.score = None
        if w.seqs:
            mine = set(map(id, w.seqs))
            self._prefilling = [s for s in self._prefilling if id(s) not in mine]
            if any(id(s) in mine for s, _ in self._rows):
                self._drop_rows(lambda s: id(s) in mine)
            for s in w.seqs:
                s.staged = None
        h = w.handle
        if error is not None:
            h.events.put(Event("error", error=error))
        else:
            self.stats["requests_done"] += 1
            h.events.put(Event("done", result=result))
        h.finished.set()

    def _fail_all(self, error: EngineError) -> None:
        if self._stopping:  # calls queued for the engine thread that will not run them again
            while self._calls:
                _, fut = self._calls.popleft()
                if not fut.done():
                    fut.set_exception(error)
        for q in self._queues.values():
            for w in list(q):
                self._finish(w, error=error)
            q.clear()
        with self._cv:
            pending = list(self._inbox)
            self._inbox.clear()
        for w in pending + list(self._active):
            self._finish(w, error=error)
        self._prefilling, self._rows = [], []
        self._batch = RowBatch.empty(self.bank.device)

    def _collect_retired(self) -> None:
        if not self._retired:
            return
        used = {w.req.adapter.slot for w in self._active}
        used |= {w.req.adapter.slot for q in self._queues.values() for w in q}
        used |= {w.req.adapter.slot for w in self._inbox}
        now = time.monotonic()
        for slot, since in list(self._retired.items()):
            if slot not in used and now - since >= self.config.retire_grace_s:
                self.bank.unregister(slot)
                del self._retired[slot]
