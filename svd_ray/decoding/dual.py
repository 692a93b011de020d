"""Adapter-on (φ) and adapter-off (θ) forward passes over the same contexts, with KV caches.

``DualModel`` is the only place that knows how a PEFT method changes the forward pass:

  lora / ia3      φ = the wrapped model with adapters enabled; θ = the same call inside
                  ``peft_model.disable_adapter()``.
  prompt_tuning   φ = soft-prompt embeddings prepended to the input embeddings; θ = the plain input.
  p_tuning_v2     φ = per-layer key/value prefixes placed in the KV cache before the input;
                  θ = an empty cache.

Both branches call the underlying transformers model directly with explicit attention masks and
position ids, so left-padded batches, KV caches, cache reordering (beam search) and cache
expansion (one prompt, many choices) work identically for every method. Positions reproduce
what PEFT's own forward uses in training: real tokens of a prompt method start at position
``num_virtual_tokens`` (virtual tokens occupy 0..n−1); the base branch starts at 0.

Each branch keeps its own cache (``BranchState``). The pair is produced by ``forward_pair``,
the single seam where a future implementation can run both passes as one mixed-adapter batch.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from svd_ray.models.peft_methods import PROMPT_METHODS

_PEFT_TYPE_TO_METHOD = {"LORA": "lora", "IA3": "ia3", "PROMPT_TUNING": "prompt_tuning", "PREFIX_TUNING": "p_tuning_v2"}


@dataclass
class BranchState:
    """KV cache and bookkeeping of one branch (adapter on or off) for a batch of rows."""

    cache: object
    attention_mask: torch.Tensor  # (B, cached length incl. virtual tokens)
    next_position: torch.Tensor  # (B,) position id of the next token

    def select_rows(self, index: torch.Tensor) -> "BranchState":
        """Keep/reorder/repeat batch rows (beam reordering, prompt → many choices). In place on the cache."""
        self.cache.reorder_cache(index)
        return BranchState(self.cache, self.attention_mask[index], self.next_position[index])


@dataclass
class DualState:
    """Caches of both branches: separate (``adapted`` + ``base``) or one batch of 2B rows (``paired``,
    rows B..2B−1 = adapter off) when the two passes run together."""

    adapted: BranchState | None
    base: BranchState | None  # None when the base pass is not needed (steering off / static)
    paired: BranchState | None = None

    @property
    def has_base(self) -> bool:
        return self.base is not None or self.paired is not None

    def select_rows(self, index: torch.Tensor) -> "DualState":
        if self.paired is not None:
            half = self.paired.attention_mask.shape[0] // 2
            return DualState(None, None, self.paired.select_rows(torch.cat([index, index + half])))
        return DualState(
            self.adapted.select_rows(index), None if self.base is None else self.base.select_rows(index)
        )


class DualModel:
    """Next-token logits with the adapter on and off, for prefill and incremental steps.

    ``model`` is a PEFT-wrapped causal LM (``PeftModel``), or a plain transformers model
    (then φ = θ: useful as a control). Call ``prefill`` once per batch of contexts, then
    ``step`` once per generated token, or ``extend`` to append several tokens at once.
    """

    def __init__(self, model, batched: bool = False):
        self.peft_model = model
        peft_config = getattr(model, "peft_config", None)
        if peft_config:
            cfg = peft_config[model.active_adapter]
            self.method = _PEFT_TYPE_TO_METHOD.get(str(cfg.peft_type.value), str(cfg.peft_type.value).lower())
            self.core = model.get_base_model()
            self.num_virtual = cfg.num_virtual_tokens if self.method in PROMPT_METHODS else 0
        else:
            self.method, self.core, self.num_virtual = None, model, 0
        self.is_prompt_method = self.method in PROMPT_METHODS
        if batched and self.method != "lora":
            raise ValueError("batched adapter-on/off passes need a LoRA adapter (PEFT mixed-adapter batches)")
        self.batched = batched

    @property
    def device(self) -> torch.device:
        return next(self.core.parameters()).device

    # ------------------------------------------------------------------ helpers
    def _adapter_disabled(self):
        if self.method is None or self.is_prompt_method:
            return nullcontext()  # prompt methods: the base pass simply omits the virtual tokens
        return self.peft_model.disable_adapter()

    def _new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.core.config)

    def _run(
        self,
        state: BranchState | None,
        input_ids,
        attention_mask,
        positions,
        *,
        adapted: bool,
        prefix=None,
        last_only=False,
        adapter_names: list[str] | None = None,
    ):
        """One forward of ``input_ids`` (B, L) appended to ``state`` (or a fresh context)."""
        kwargs = {}
        if state is None:
            cache = self._new_cache()
            past_mask = attention_mask[:, :0]
            if adapted and self.method == "prompt_tuning":
                embeds = self.core.get_input_embeddings()(input_ids)
                soft = prefix.to(embeds.dtype)
                kwargs["inputs_embeds"] = torch.cat([soft, embeds], dim=1)
                ones = attention_mask.new_ones(attention_mask.shape[0], self.num_virtual)
                attention_mask = torch.cat([ones, attention_mask], dim=1)
                virtual_pos = torch.arange(self.num_virtual, device=positions.device).expand(positions.shape[0], -1)
                positions = torch.cat([virtual_pos, positions], dim=1)
            elif adapted and self.method == "p_tuning_v2":
                cache = prefix
                past_mask = attention_mask.new_ones(attention_mask.shape[0], self.num_virtual)
        else:
            cache, past_mask = state.cache, state.attention_mask
        full_mask = torch.cat([past_mask, attention_mask], dim=1)
        if "inputs_embeds" not in kwargs:
            kwargs["input_ids"] = input_ids
        if adapter_names is not None:  # one batch, a different adapter per row (PEFT mixed batch)
            context = self.peft_model.base_model._enable_peft_forward_hooks(adapter_names=adapter_names)
        else:
            context = nullcontext() if adapted else self._adapter_disabled()
        with context:
            out = self.core(
                attention_mask=full_mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1 if last_only else 0,
                **kwargs,
            )
        logits = out.logits
        if kwargs.get("inputs_embeds") is not None and not last_only:
            logits = logits[:, self.num_virtual :]
        next_pos = positions[:, -1] + 1
        return logits, BranchState(cache, full_mask, next_pos)  # the cache object was updated in place

    # ------------------------------------------------------------------ API
    def forward_pair(
        self, state: DualState | None, input_ids, attention_mask, positions, *, with_base: bool, last_only=False
    ):
        """Run both branches on the same new tokens; returns (z_φ, z_θ or None, new DualState).

        ``last_only`` computes logits for the last position only (decoding), else for all.
        This is the seam for batching the two passes together (mixed-adapter batch) later.
        """
        b = input_ids.shape[0]
        if self.batched and with_base:
            return self._forward_paired(state, input_ids, attention_mask, positions, last_only)
        prefix = None
        if state is None and self.is_prompt_method:
            prefix = self.peft_model.get_prompt(batch_size=b)
        adapted_pos = positions + self.num_virtual
        z_phi, adapted = self._run(
            None if state is None else state.adapted,
            input_ids,
            attention_mask,
            adapted_pos,
            adapted=True,
            prefix=prefix,
            last_only=last_only,
        )
        z_theta, base = None, None
        if with_base:
            z_theta, base = self._run(
                None if state is None else state.base,
                input_ids,
                attention_mask,
                positions,
                adapted=False,
                last_only=last_only,
            )
        return z_phi, z_theta, DualState(adapted, base)

    def _forward_paired(self, state, input_ids, attention_mask, positions, last_only):
        """Adapter on and off as ONE forward of 2B rows: rows 0..B−1 use the adapter, B..2B−1 ``__base__``."""
        b = input_ids.shape[0]
        names = [self.peft_model.active_adapter] * b + ["__base__"] * b
        logits, paired = self._run(
            None if state is None else state.paired,
            torch.cat([input_ids, input_ids]),
            torch.cat([attention_mask, attention_mask]),
            torch.cat([positions, positions]),
            adapted=True,
            last_only=last_only,
            adapter_names=names,
        )
        return logits[:b], logits[b:], DualState(None, None, paired)

    @torch.no_grad()
    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        with_base: bool = True,
        last_only: bool = False,
    ):
        """Encode left-padded contexts. Returns logits (B, L, V) of both branches (L = 1 if last_only)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        return self.forward_pair(None, input_ids, attention_mask, positions, with_base=with_base, last_only=last_only)

    @torch.no_grad()
    def extend(
        self, state: DualState, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, last_only=False
    ):
        """Append tokens (B, L) (right-padded rows allowed via ``attention_mask``) to cached contexts."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        offsets = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        if state.paired is not None:
            base_next = state.paired.next_position[: state.paired.next_position.shape[0] // 2]
        else:  # the adapted branch's positions include the virtual-token offset; the base one's do not
            base_next = state.adapted.next_position - self.num_virtual
        positions = base_next[:, None] + offsets
        return self.forward_pair(
            state, input_ids, attention_mask, positions, with_base=state.has_base, last_only=last_only
        )

    @torch.no_grad()
    def step(self, state: DualState, next_tokens: torch.Tensor):
        """One decoding step: next_tokens (B,) → (z_φ (B, V), z_θ (B, V) or None, state)."""
        z_phi, z_theta, state = self.extend(state, next_tokens[:, None], last_only=True)
        return z_phi[:, -1], None if z_theta is None else z_theta[:, -1], state

    def teacher_forced_logits(self, input_ids, attention_mask=None, *, with_base: bool = True):
        """Full-sequence logits of both branches (no cache kept); grads flow if enabled by caller."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        z_phi, z_theta, _ = self.forward_pair(None, input_ids, attention_mask, positions, with_base=with_base)
        return z_phi, z_theta
