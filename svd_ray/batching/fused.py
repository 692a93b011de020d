"""``DualModel``'s interface over one adapter slot of an ``AdapterBank``: adapter on and off in ONE forward.

``FusedDual(bank, slot)`` can stand in for ``DualModel`` wherever the decoding code takes one
(``generate``, beam search, ``score_choice_ids``). Its state is a ``RowBatch`` whose first half holds the
adapter-on rows and second half the adapter-off rows (slot −1: no LoRA/IA3 term, no soft prompt, no
prefix), so a steered token costs one forward of 2B rows instead of two forwards of B rows — for all
four PEFT methods, not only LoRA. ``with_base=False`` (static / off steering) runs the adapted half only.
"""
from __future__ import annotations

import torch

from svd_ray.batching.adapters import AdapterBank
from svd_ray.batching.rows import RowBatch, RowSpec, extend, prefill


class FusedState:
    """Rows [0, B) adapted, [B, 2B) base when ``paired``; else B adapted rows only."""

    def __init__(self, batch: RowBatch, paired: bool):
        self.batch, self.paired = batch, paired

    @property
    def has_base(self) -> bool:
        return self.paired

    def select_rows(self, index: torch.Tensor) -> "FusedState":
        index = index.to(self.batch.slots.device)
        if self.paired:
            half = len(self.batch) // 2
            index = torch.cat([index, index + half])
        return FusedState(self.batch.select(index), self.paired)


class FusedDual:
    def __init__(self, bank: AdapterBank, slot: int):
        self.bank, self.slot = bank, slot
        entry = bank.entries[slot]
        self.method = entry.method
        self.num_virtual = entry.num_virtual
        self.is_prompt_method = entry.num_virtual > 0
        self.core = bank.model

    @property
    def device(self) -> torch.device:
        return self.bank.device

    def _split(self, logits: torch.Tensor, paired: bool):
        if not paired:
            return logits, None
        half = logits.shape[0] // 2
        return logits[:half], logits[half:]

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, with_base: bool = True,
                last_only: bool = False):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        rows = [ids[m.bool()].tolist() for ids, m in zip(input_ids, attention_mask)]
        specs = [RowSpec(self.slot, r) for r in rows] + ([RowSpec(-1, r) for r in rows] if with_base else [])
        batch, logits = prefill(self.bank, specs, last_only=last_only)
        if not last_only:  # right-aligned rows: keep the last L positions (the tokens, not soft prompts)
            logits = logits[:, -input_ids.shape[1]:]
            if not bool(attention_mask.all()):
                raise ValueError("FusedDual.prefill with last_only=False needs unpadded rows")
        z_phi, z_theta = self._split(logits, with_base)
        return z_phi, z_theta, FusedState(batch, with_base)

    @torch.no_grad()
    def extend(self, state: FusedState, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               last_only: bool = False):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        valid = attention_mask.bool()
        if state.paired:
            input_ids, valid = torch.cat([input_ids, input_ids]), torch.cat([valid, valid])
        logits = extend(self.bank, state.batch, input_ids, valid, last_only=last_only)
        z_phi, z_theta = self._split(logits, state.paired)
        return z_phi, z_theta, state

    @torch.no_grad()
    def step(self, state: FusedState, next_tokens: torch.Tensor):
        z_phi, z_theta, state = self.extend(state, next_tokens[:, None], last_only=True)
        return z_phi[:, -1], None if z_theta is None else z_theta[:, -1], state
