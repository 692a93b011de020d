"""SVDecode as a ``transformers`` LogitsProcessor, for users who call ``model.generate`` themselves.

    processor = SVDecodeLogitsProcessor(peft_model, mu=..., alpha=0.1)
    peft_model.generate(input_ids, logits_processor=LogitsProcessorList([processor]), ...)

``generate`` runs the adapter-on pass and hands its scores to the processor; the processor runs
the adapter-off pass for the same tokens with its own KV cache (one new token per step) and
returns ẑ = z_φ + μ·δ in the mask, −inf elsewhere. Put it FIRST in the processor list: later
processors (temperature, top-k …) then act on ẑ, as in our own decoder.

It checks at every call that the rows it cached are a prefix of the new ``input_ids``; when they
are not (beam search reorders rows, or a new prompt) it re-encodes from scratch, which is always
correct, just slower. For beam search prefer ``svd_ray.decoding.generate``. Left padding is
supported when the prompt's ``attention_mask`` is passed to the constructor.
"""
from __future__ import annotations

import torch

from svd_ray.decoding.dual import BranchState, DualModel
from svd_ray.steering import DEFAULT_ALPHA, form_steered_logits


class SVDecodeLogitsProcessor:
    def __init__(self, model, mu: float, alpha: float = DEFAULT_ALPHA, attention_mask: torch.Tensor | None = None):
        self.dual = model if isinstance(model, DualModel) else DualModel(model)
        self.mu, self.alpha = mu, alpha
        self.prompt_mask = attention_mask
        self._state: BranchState | None = None
        self._seen: torch.Tensor | None = None

    def reset(self) -> None:
        self._state, self._seen = None, None

    def _mask_for(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = torch.ones_like(input_ids)
        if self.prompt_mask is not None and self.prompt_mask.shape[0] == input_ids.shape[0]:
            n = min(self.prompt_mask.shape[1], input_ids.shape[1])
            mask[:, :n] = self.prompt_mask[:, :n].to(mask)
        return mask

    @torch.no_grad()
    def base_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Adapter-off next-token logits for ``input_ids`` (B, L), reusing the cache when possible."""
        seen = self._seen
        reusable = (
            seen is not None
            and seen.shape[0] == input_ids.shape[0]
            and seen.shape[1] == input_ids.shape[1] - 1
            and torch.equal(seen, input_ids[:, :-1])
        )
        if reusable:
            new = input_ids[:, -1:]
            positions = self._state.next_position[:, None]
            logits, self._state = self.dual._run(
                self._state, new, torch.ones_like(new), positions, adapted=False, last_only=True
            )
        else:
            mask = self._mask_for(input_ids)
            positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
            logits, self._state = self.dual._run(None, input_ids, mask, positions, adapted=False, last_only=True)
        self._seen = input_ids.clone()
        return logits[:, -1]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        base = self.base_logits(input_ids)
        return form_steered_logits(scores, base, mode="svdecode", mu=self.mu, alpha=self.alpha).to(scores.dtype)
