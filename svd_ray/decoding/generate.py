"""Steered generation: two cached forward passes per token (adapter on / off), then select.

Per step:  z_φ, z_θ = DualModel.step(...)  →  ẑ = SteeringConfig.steer(z_φ, z_θ)  →  greedy,
sampling (temperature, top-k, top-p) or beam search on p̂ = softmax(ẑ). The prompt is
prefilled once per branch; every later step feeds one token per row (never the whole prefix).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from svd_ray.decoding.config import GenerationConfig, SteeringConfig
from svd_ray.decoding.dual import DualModel


@dataclass
class GenerationResult:
    token_ids: list[int]
    finish_reason: str  # "eos" | "length" | "stop"
    text: str | None = None


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then nucleus (top-p) filtering; removed entries become −inf, the best always stays."""
    out = logits
    if top_k and top_k < out.shape[-1]:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass strictly before it already reaches top_p
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop_sorted[..., 0] = False  # the best token stays even when top_p rounds to 0 in float32
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def sampling_logits(steered: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """log-probabilities (unnormalised) to sample from: (ẑ − max ẑ) / T, then top-k / top-p.

    Subtracting the row maximum first keeps every finite temperature > 0 numerically safe: the best token
    is 0 and the rest are ≤ 0 (possibly −inf), so no inf − inf, and softmax never sees NaN.
    """
    z = steered.float()
    z = z - z.max(dim=-1, keepdim=True).values
    # T may round to 0 in float32 (or be flushed as a denormal): then z/T is −inf for every non-best token
    # and 0/0 = NaN for the best ones, which are put back to 0 — the T → 0 limit, i.e. greedy.
    z = torch.where(z == 0, torch.zeros_like(z), z / temperature)
    z = torch.nan_to_num(z, nan=float("-inf"), neginf=float("-inf"))
    return filter_logits(z, top_k, top_p)


def select_tokens(steered: torch.Tensor, gen: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Greedy or sampled next tokens (B,) from steered logits (B, V)."""
    if not gen.do_sample:
        return steered.argmax(-1)
    probs = torch.softmax(sampling_logits(steered, gen.temperature, gen.top_k, gen.top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _generator(gen: GenerationConfig, device) -> torch.Generator | None:
    if not gen.do_sample:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(gen.seed if gen.seed is not None else torch.seed())
    return g


def iter_generate(
    dual: DualModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    steering: SteeringConfig,
    gen: GenerationConfig,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Greedy / sampled decoding, one step at a time.

    Yields (tokens (B,), finished (B,) bool *before* this step) so callers can stream; rows that
    already finished keep yielding EOS/pad and must be ignored by the caller.
    """
    if gen.num_beams > 1:
        raise ValueError("iter_generate does not do beam search; use generate()")
    eos = torch.tensor(sorted(gen.eos_token_ids) or [-1], device=input_ids.device)
    z_phi, z_theta, state = dual.prefill(input_ids, attention_mask, with_base=steering.needs_base, last_only=True)
    z_phi, z_theta = z_phi[:, -1], None if z_theta is None else z_theta[:, -1]
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    generator = _generator(gen, input_ids.device)
    for step in range(gen.max_new_tokens):
        steered = steering.steer(z_phi, z_theta)
        if step < gen.min_new_tokens and gen.eos_token_ids:
            steered[:, list(gen.eos_token_ids)] = float("-inf")
        tokens = select_tokens(steered, gen, generator)
        tokens = torch.where(finished, eos[0].clamp_min(0), tokens)
        yield tokens, finished.clone()
        finished |= torch.isin(tokens, eos)
        if bool(finished.all()) or step == gen.max_new_tokens - 1:
            return
        z_phi, z_theta, state = dual.step(state, tokens)


def _greedy_or_sample(dual, input_ids, attention_mask, steering, gen) -> list[GenerationResult]:
    b = input_ids.shape[0]
    out: list[list[int]] = [[] for _ in range(b)]
    reason = ["length"] * b
    for tokens, finished in iter_generate(dual, input_ids, attention_mask, steering, gen):
        for i in range(b):
            if finished[i]:
                continue
            t = int(tokens[i])
            if t in gen.eos_token_ids:
                reason[i] = "eos"
            else:
                out[i].append(t)
    return [GenerationResult(ids, r) for ids, r in zip(out, reason)]


def _beam_search(dual, input_ids, attention_mask, steering, gen) -> list[GenerationResult]:
    """Beam search on log p̂; a hypothesis' score is Σ log p̂ / length^length_penalty."""
    return run_to_end(iter_beam_search(dual, input_ids, attention_mask, steering, gen))


def run_to_end(steps):
    """Drive a step generator (``iter_beam_search``, ``iter_choice_scores``) to the end; return its value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def iter_beam_search(dual, input_ids, attention_mask, steering, gen):
    """``_beam_search`` one forward at a time: yields after every forward, returns the results (so a
    scheduler can interleave it with other work)."""
    b, k = input_ids.shape[0], gen.num_beams
    device = input_ids.device
    z_phi, z_theta, state = dual.prefill(input_ids, attention_mask, with_base=steering.needs_base, last_only=True)
    yield
    rows = torch.arange(b, device=device).repeat_interleave(k)
    state = state.select_rows(rows)
    z_phi, z_theta = z_phi[rows, -1], None if z_theta is None else z_theta[rows, -1]
    beam_scores = torch.full((b, k), float("-inf"), device=device)
    beam_scores[:, 0] = 0.0  # all beams start identical: only one is live at first
    beam_tokens = torch.zeros(b, k, 0, dtype=torch.long, device=device)
    done: list[list[tuple[float, list[int], str]]] = [[] for _ in range(b)]
    eos = set(gen.eos_token_ids)

    for step in range(gen.max_new_tokens):
        logp = torch.log_softmax(steering.steer(z_phi, z_theta), dim=-1)  # (b·k, V)
        if step < gen.min_new_tokens and eos:
            logp[:, sorted(eos)] = float("-inf")
        vocab = logp.shape[-1]
        cand = (beam_scores.view(-1, 1) + logp).view(b, k * vocab)
        top_scores, top_idx = torch.topk(cand, min(2 * k, k * vocab), dim=-1)
        next_scores = torch.full((b, k), float("-inf"), device=device)
        next_src = torch.zeros(b, k, dtype=torch.long, device=device)
        next_tok = torch.zeros(b, k, dtype=torch.long, device=device)
        for i in range(b):
            filled = 0
            for score, idx in zip(top_scores[i].tolist(), top_idx[i].tolist()):
                if score == float("-inf") or filled == k:
                    break
                src, tok = divmod(idx, vocab)
                if tok in eos:
                    if len(done[i]) < k:
                        seq = beam_tokens[i, src].tolist()
                        done[i].append((score / max(len(seq) + 1, 1) ** gen.length_penalty, seq, "eos"))
                    continue
                next_scores[i, filled], next_src[i, filled], next_tok[i, filled] = score, src, tok
                filled += 1
        beam_tokens = torch.cat([beam_tokens.gather(1, next_src[..., None].expand(-1, -1, beam_tokens.shape[-1])),
                                 next_tok[..., None]], dim=-1)
        beam_scores = next_scores
        all_done = all(len(done[i]) >= k or not torch.isfinite(beam_scores[i]).any() for i in range(b))
        if all_done or step == gen.max_new_tokens - 1:
            break
        order = (torch.arange(b, device=device)[:, None] * k + next_src).view(-1)
        state = state.select_rows(order)
        z_phi, z_theta, state = dual.step(state, next_tok.view(-1))
        yield

    results = []
    length = beam_tokens.shape[-1]
    for i in range(b):
        hyps = list(done[i])
        for j in range(k):
            if torch.isfinite(beam_scores[i, j]):
                hyps.append((float(beam_scores[i, j]) / max(length, 1) ** gen.length_penalty,
                             beam_tokens[i, j].tolist(), "length"))
        best = max(hyps, key=lambda h: h[0])
        results.append(GenerationResult(best[1], best[2]))
    return results


def generate(
    dual: DualModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    steering: SteeringConfig,
    gen: GenerationConfig,
) -> list[GenerationResult]:
    """Generate continuations for left-padded ``input_ids`` (B, L). Returns new tokens per row (no EOS)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if gen.num_beams > 1:
        return _beam_search(dual, input_ids, attention_mask, steering, gen)
    return _greedy_or_sample(dual, input_ids, attention_mask, steering, gen)


def encode_prompts(tokenizer, prompts: list[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded batch encoding (generation appends on the right)."""
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = old_side
    ids, mask = enc["input_ids"], enc["attention_mask"]
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    return ids, mask


def default_eos_ids(tokenizer) -> tuple[int, ...]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    return tuple(sorted(i for i in ids if i is not None))


def generate_text(
    dual: DualModel,
    tokenizer,
    prompts: list[str],
    steering: SteeringConfig,
    gen: GenerationConfig,
) -> list[GenerationResult]:
    """Text in, text out; applies ``gen.stop_strings`` by truncating the decoded text."""
    if not gen.eos_token_ids:
        from dataclasses import replace

        gen = replace(gen, eos_token_ids=default_eos_ids(tokenizer))
    ids, mask = encode_prompts(tokenizer, prompts, dual.device)
    results = generate(dual, ids, mask, steering, gen)
    for r in results:
        text = tokenizer.decode(r.token_ids, skip_special_tokens=True)
        for stop in gen.stop_strings:
            cut = text.find(stop)
            if cut >= 0:
                text, r.finish_reason = text[:cut], "stop"
        r.text = text
    return results
