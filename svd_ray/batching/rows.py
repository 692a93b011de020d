"""A batch of decoding rows with one left-padded KV cache, and the forwards that grow it.

Every row is one context: a request's adapter-on row, its adapter-off row, a beam, a choice being
teacher-forced. Rows differ in length, adapter slot, virtual tokens and position ids; the cache is one
tensor per layer of shape (R, H, T, hd) whose rows are right-aligned (left padding, masked out), so

  * a decode step is one forward of R rows × 1 token, whatever mix of tasks and methods the rows hold;
  * rows join (``RowBatch.concat``: the shorter side is left-padded) and leave (``select``) between
    steps — continuous batching — and all-padding columns at the left are trimmed;
  * a row's position ids are its own (explicit ``position_ids``), so padding never shifts RoPE, and
    prompt-method rows start their real tokens at ``num_virtual`` as in PEFT's forward.

A new row (``RowSpec``) is prefilled with ``prefill``: its soft prompt (prompt tuning) is prepended to
its input embeddings, its key/value prefix (P-tuning v2) is put in front of its cache, and padding
anywhere in a row is masked. Sliding-window layers see full attention as long as every row fits in the
window, which the engine enforces (``Engine``: context capped at the window).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from svd_ray.batching.adapters import AdapterBank


@dataclass
class RowSpec:
    """A row to prefill: adapter ``slot`` (−1 = base) and its first ``tokens``."""

    slot: int
    tokens: list[int]


class RowBatch:
    """Rows with a shared left-padded cache. ``mask`` (R, T) marks real cache entries."""

    def __init__(self, cache: DynamicCache | None, mask: torch.Tensor, next_pos: torch.Tensor, slots: torch.Tensor):
        self.cache, self.mask, self.next_pos, self.slots = cache, mask, next_pos, slots

    def __len__(self) -> int:
        return int(self.slots.shape[0])

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    def kv_entries(self) -> int:
        """Cache slots held (rows × width, padding included): what memory budgets count."""
        return len(self) * self.width

    @staticmethod
    def empty(device) -> "RowBatch":
        z = torch.zeros(0, dtype=torch.long, device=device)
        return RowBatch(None, torch.zeros(0, 0, dtype=torch.long, device=device), z, z.clone())

    # ------------------------------------------------------------------ row bookkeeping
    def select(self, index: torch.Tensor) -> "RowBatch":
        """A new batch of rows ``index`` (reorder / repeat / drop); trims all-padding columns."""
        if index.numel() == 0:
            return RowBatch.empty(self.mask.device)
        cache = None
        if self.cache is not None:
            cache = DynamicCache(ddp_cache_data=[(layer.keys.index_select(0, index), layer.values.index_select(0, index))
                                                 for layer in self.cache.layers])
        out = RowBatch(cache, self.mask.index_select(0, index), self.next_pos.index_select(0, index),
                       self.slots.index_select(0, index))
        out._trim()
        return out

    def _trim(self) -> None:
        if self.width == 0 or len(self) == 0:
            return
        used = self.mask.any(0).nonzero()
        first = int(used[0]) if used.numel() else self.width
        if first == 0:
            return
        self.mask = self.mask[:, first:]
        if self.cache is not None:
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, first:]
                layer.values = layer.values[:, :, first:]

    @staticmethod
    def concat(a: "RowBatch", b: "RowBatch") -> "RowBatch":
        """Rows of ``a`` then rows of ``b``; the narrower cache is left-padded to the wider one."""
        return RowBatch.concat_many([a, b])

    @staticmethod
    def concat_many(batches: list["RowBatch"]) -> "RowBatch":
        """The rows of every batch in order, in one copy; narrower caches are left-padded."""
        batches = [b for b in batches if len(b)]
        if not batches:
            raise ValueError("nothing to concatenate")
        if len(batches) == 1:
            return batches[0]
        width = max(b.width for b in batches)

        def pad(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
            if n == 0:
                return t
            shape = list(t.shape)
            shape[dim] = n
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        mask = torch.cat([pad(b.mask, width - b.width, 1) for b in batches])
        layers = []
        for per_layer in zip(*(b.cache.layers for b in batches)):
            k = torch.cat([pad(la.keys, width - b.width, 2) for la, b in zip(per_layer, batches)])
            v = torch.cat([pad(la.values, width - b.width, 2) for la, b in zip(per_layer, batches)])
            layers.append((k, v))
        return RowBatch(DynamicCache(ddp_cache_data=layers), mask, torch.cat([b.next_pos for b in batches]),
                        torch.cat([b.slots for b in batches]))


def _forward(bank: AdapterBank, batch: RowBatch, new_mask: torch.Tensor, positions: torch.Tensor, *,
             input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
             last_only: bool) -> torch.Tensor:
    """One forward appending (R, L) new entries to ``batch`` in place; logits (R, L or 1, V)."""
    cache = batch.cache if batch.cache is not None else DynamicCache(config=bank.config)
    full_mask = torch.cat([batch.mask, new_mask], dim=1)
    kwargs = {"input_ids": input_ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
    with bank.rows(batch.slots):
        out = bank.model(attention_mask=full_mask, position_ids=positions, cache=cache, use_cache=True,
                         logits_to_keep=1 if last_only else 0, **kwargs)
    batch.cache, batch.mask = cache, full_mask
    batch.next_pos = positions[:, -1] + 1
    return out.logits


def prefill(bank: AdapterBank, specs: list[RowSpec], *, last_only: bool = True) -> tuple[RowBatch, torch.Tensor]:
    """Encode new rows (one forward). Returns their batch and logits (R, 1 or L, V) over the tokens
    (with ``last_only=False`` position j predicts token j+1 of each row's ``tokens``, right-aligned:
    row r's tokens occupy the last ``len(specs[r].tokens)`` positions)."""
    device = bank.device
    entries = [bank.entries.get(s.slot) if s.slot >= 0 else None for s in specs]
    for s, e in zip(specs, entries):
        if s.slot >= 0 and e is None:
            raise KeyError(f"adapter slot {s.slot} is not registered")
        if not s.tokens:
            raise ValueError("a row needs at least one token")
    soft = [e.soft_prompt if e is not None and e.soft_prompt is not None else None for e in entries]
    prefix = [e.prefix if e is not None and e.prefix is not None else None for e in entries]
    n_soft = [0 if t is None else t.shape[0] for t in soft]
    n_pref = [0 if p is None else p[0][0].shape[1] for p in prefix]
    lengths = [ns + len(s.tokens) for ns, s in zip(n_soft, specs)]
    r, width = len(specs), max(lengths)
    ids = torch.zeros(r, width, dtype=torch.long, device=device)
    mask = torch.zeros(r, width, dtype=torch.long, device=device)
    positions = torch.zeros(r, width, dtype=torch.long, device=device)
    for i, s in enumerate(specs):
        n = len(s.tokens)
        ids[i, width - n:] = torch.tensor(s.tokens, device=device)
        mask[i, width - lengths[i]:] = 1
        start = n_soft[i] + n_pref[i]  # real tokens start after the virtual tokens (PEFT's positions)
        positions[i, width - n:] = torch.arange(start, start + n, device=device)
        positions[i, width - lengths[i]: width - n] = torch.arange(n_soft[i], device=device)
    embeds = None
    if any(n_soft):
        embeds = bank.embed(ids)
        for i, t in enumerate(soft):
            if t is not None:
                embeds[i, width - lengths[i]: width - len(specs[i].tokens)] = t.to(embeds.dtype)
    slots = torch.tensor([s.slot for s in specs], dtype=torch.long, device=device)
    p = max(n_pref)
    if p:
        layers = []
        n_layers = len(next(x for x in prefix if x is not None))
        for layer in range(n_layers):
            ref_k, ref_v = next(x for x in prefix if x is not None)[layer]
            k = ref_k.new_zeros(r, ref_k.shape[0], p, ref_k.shape[2])
            v = ref_v.new_zeros(r, ref_v.shape[0], p, ref_v.shape[2])
            for i, pre in enumerate(prefix):
                if pre is not None:
                    k[i, :, p - n_pref[i]:] = pre[layer][0]
                    v[i, :, p - n_pref[i]:] = pre[layer][1]
            layers.append((k, v))
        past_mask = torch.zeros(r, p, dtype=torch.long, device=device)
        for i, n in enumerate(n_pref):
            past_mask[i, p - n:] = 1
        batch = RowBatch(DynamicCache(ddp_cache_data=layers), past_mask, positions[:, 0], slots)
    else:
        batch = RowBatch(None, torch.zeros(r, 0, dtype=torch.long, device=device), positions[:, 0], slots)
    logits = _forward(bank, batch, mask, positions, input_ids=None if embeds is not None else ids,
                      inputs_embeds=embeds, last_only=last_only)
    return batch, logits


def extend(bank: AdapterBank, batch: RowBatch, tokens: torch.Tensor, valid: torch.Tensor | None = None, *,
           last_only: bool = False) -> torch.Tensor:
    """Append ``tokens`` (R, L) to every row (``valid`` (R, L): False = right padding, masked)."""
    if valid is None:
        valid = torch.ones_like(tokens, dtype=torch.bool)
    offsets = (valid.long().cumsum(-1) - 1).clamp_min(0)
    positions = batch.next_pos[:, None] + offsets
    next_pos = batch.next_pos + valid.long().sum(-1)
    logits = _forward(bank, batch, valid.long(), positions, input_ids=tokens, last_only=last_only)
    batch.next_pos = next_pos
    return logits


def step(bank: AdapterBank, batch: RowBatch, tokens: torch.Tensor) -> torch.Tensor:
    """One decoding step: ``tokens`` (R,) → next-token logits (R, V)."""
    return extend(bank, batch, tokens[:, None], last_only=True)[:, -1]
