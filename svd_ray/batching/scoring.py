"""Multiple-choice scoring as bounded forwards that the engine merges ACROSS requests.

A ``ScoreJob`` is one score request as a small state machine. ``plan()`` says what its next forward is
(prefill the first prompt chunk, extend the prompt, or teacher-force the next positions of a group of
choices); ``consume()`` takes that forward's logits. The engine collects the plans of every active
job, runs all prompt chunks in one forward and all choice chunks in another (``run_plans``: rows of
different requests, tasks and methods side by side, shorter plans right-padded), and hands each job
its rows back. Per job and forward at most ``max_rows`` rows and ``chunk`` positions exist, and a merged
forward holds at most ``max_rows`` rows, so at most ``max_rows × chunk × |V|`` logits are alive at once.

The numbers are those of ``decoding.scoring.score_choice_ids`` (tested equal): the prompt is encoded
once per branch, its cache copied per choice group; token 0 of a choice is scored with the prompt's last
logits, token j with the logits after token j−1; ẑ via ``steering.form_steered_logits``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from svd_ray.batching.adapters import AdapterBank
from svd_ray.batching.rows import RowBatch, RowSpec, extend, prefill
from svd_ray.decoding.scoring import ChoiceScores, ChoiceTally


@dataclass
class Plan:
    """One job's next forward: ``specs`` (a fresh prefill) or ``batch`` + ``tokens``/``valid`` (an extend)."""

    job: "ScoreJob"
    specs: list[RowSpec] | None = None
    batch: RowBatch | None = None
    tokens: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    last_only: bool = False

    @property
    def rows(self) -> int:
        return len(self.specs) if self.specs is not None else len(self.batch)


class ScoreJob:
    def __init__(self, req, *, max_rows: int, chunk: int, device, token_budget: int | None = None):
        self.req = req
        self.slot = req.adapter.slot
        self.prompt, self.choices = list(req.prompt), [list(c) for c in req.choices]
        self.steering, self.outside = req.steering, req.outside_mask
        self.group_size = max(1, max_rows // 2)  # a choice takes an adapter-on and an adapter-off row
        self.chunk = max(1, chunk)
        self.budget = token_budget or 2 * self.group_size * self.chunk  # positions (rows × tokens) per forward
        self.device = device
        self.consumed = 0  # prompt tokens encoded
        self.prompt_batch: RowBatch | None = None  # rows [on, off] after the prompt
        self.z_last: torch.Tensor | None = None  # (2, V): the prompt's last logits, on and off
        self.next_choice = 0
        self.group: list[int] | None = None
        self.gbatch: RowBatch | None = None
        self.gtokens = self.gvalid = None
        self.pos = 0  # positions of the current group already fed
        self.tally = ChoiceTally(self.choices, self.steering, self.outside, top_k=getattr(req, "top_logprobs", 0))
        self.done = False
        self.pending: Plan | None = None  # a plan made but not run (the merged forward was full)

    # ------------------------------------------------------------------ planning
    def plan(self, budget: int | None = None) -> Plan | None:
        """The next forward (None when the job is complete), sized to ``budget`` positions (rows × tokens) if
        given. Call once per forward: it advances the job."""
        if budget is not None:
            self.budget = max(1, int(budget))
        if self.pending is not None:
            plan, self.pending = self.pending, None
            return plan
        if self.done:
            return None
        if self.consumed < len(self.prompt):
            chunk = self.prompt[self.consumed: self.consumed + self._k(2)]
            if self.prompt_batch is None:
                return Plan(self, specs=[RowSpec(self.slot, chunk), RowSpec(-1, chunk)], last_only=True)
            t = torch.tensor([chunk, chunk], device=self.device)
            return Plan(self, batch=self.prompt_batch, tokens=t, valid=torch.ones_like(t, dtype=torch.bool),
                        last_only=True)
        while True:
            if self.group is None and not self._open_group():
                self.done = True
                return None
            longest = self.gtokens.shape[1]
            if self.pos < longest - 1:
                k = min(self._k(2 * len(self.group)), longest - 1 - self.pos)
                t = self.gtokens[:, self.pos: self.pos + k]
                v = self.gvalid[:, self.pos: self.pos + k]
                return Plan(self, batch=self.gbatch, tokens=torch.cat([t, t]), valid=torch.cat([v, v]))
            self.group = None  # this group is scored through; next one

    def _k(self, rows: int) -> int:
        return max(1, min(self.chunk, self.budget // rows))

    def _open_group(self) -> bool:
        if self.next_choice >= len(self.choices):
            return False
        idx = list(range(self.next_choice, min(len(self.choices), self.next_choice + self.group_size)))
        self.next_choice = idx[-1] + 1
        g, longest = len(idx), max(len(self.choices[i]) for i in idx)
        tokens = torch.zeros(g, longest, dtype=torch.long, device=self.device)
        valid = torch.zeros(g, longest, dtype=torch.bool, device=self.device)
        for r, i in enumerate(idx):
            tokens[r, : len(self.choices[i])] = torch.tensor(self.choices[i], device=self.device)
            valid[r, : len(self.choices[i])] = True
        # token 0 of every choice: the prompt's last logits
        self.tally.add(idx, self.z_last[0].expand(g, -1)[:, None], self.z_last[1].expand(g, -1)[:, None],
                      tokens[:, :1], valid[:, :1])
        self.group, self.gtokens, self.gvalid, self.pos = idx, tokens, valid, 0
        if longest > 1:
            on = torch.zeros(g, dtype=torch.long, device=self.device)
            self.gbatch = self.prompt_batch.select(torch.cat([on, on + 1]))
        return True

    # ------------------------------------------------------------------ results of a forward
    def consume(self, plan: Plan, batch: RowBatch, logits: torch.Tensor) -> None:
        if self.consumed < len(self.prompt):
            self.consumed += int(plan.tokens.shape[1]) if plan.tokens is not None else len(plan.specs[0].tokens)
            self.prompt_batch = batch
            if self.consumed >= len(self.prompt):
                self.z_last = logits[:, -1]
            return
        g = len(self.group)
        k = int(plan.tokens.shape[1])
        zp, zt = logits[:g, :k], logits[g:, :k]
        self.tally.add(self.group, zp, zt, self.gtokens[:, self.pos + 1: self.pos + 1 + k],
                      self.gvalid[:, self.pos + 1: self.pos + 1 + k])
        self.gbatch = batch
        self.pos += k

    def result(self) -> ChoiceScores:
        return self.tally.result()


def run_plans(bank: AdapterBank, plans: list[Plan]) -> int:
    """Run ``plans`` of several jobs as at most two forwards (fresh prefills; extends) and feed each job its
    rows back. Returns the number of token positions processed."""
    done = 0
    fresh = [p for p in plans if p.specs is not None]
    if fresh:
        specs = [s for p in fresh for s in p.specs]
        batch, logits = prefill(bank, specs, last_only=True)
        start = 0
        for p in fresh:
            n = len(p.specs)
            rows = torch.arange(start, start + n, device=bank.device)
            p.job.consume(p, batch.select(rows), logits[start:start + n])
            start += n
        done += sum(len(s.tokens) for s in specs)
    ext = [p for p in plans if p.specs is None]
    if ext:
        width = max(int(p.tokens.shape[1]) for p in ext)
        tokens = torch.cat([torch.nn.functional.pad(p.tokens, (0, width - p.tokens.shape[1])) for p in ext])
        valid = torch.cat([torch.nn.functional.pad(p.valid, (0, width - p.valid.shape[1])) for p in ext])
        merged = RowBatch.concat_many([p.batch for p in ext])
        # last position only when it is every plan's last token (right padding would make it a pad for some)
        last_only = all(p.last_only and int(p.tokens.shape[1]) == width for p in ext)
        logits = extend(bank, merged, tokens, valid, last_only=last_only)
        start = 0
        for p in ext:
            n = len(p.batch)
            rows = torch.arange(start, start + n, device=bank.device)
            k = int(p.tokens.shape[1])
            lg = logits[start:start + n]
            if lg.shape[1] > 1 and p.last_only:  # this plan wanted its last valid position only
                lg = lg[:, k - 1:k]
            elif lg.shape[1] > 1:
                lg = lg[:, :k]
            p.job.consume(p, merged.select(rows) if len(ext) > 1 else merged, lg)
            start += n
        done += int(valid.sum())
    return done
