"""Multiple-choice scoring by teacher forcing under the steered distribution.

For a prompt x and a choice c = (c_1..c_m):   ll(c) = Σ_j log p̂(c_j | x, c_<j),
with δ recomputed from z_φ and z_θ at every answer position. The prompt is encoded once per
branch and its KV cache is shared by all choices (expanded, not recomputed).

A choice token outside the plausibility mask (policy ``outside_mask``):
  "unmasked" (default)  log p̂ = log_softmax(z_φ + μ·(δ ⊙ m)) over the full vocabulary: the mask
                        decides where steering acts, but no token is removed. This is exactly the
                        objective μ̄ was calibrated on (μ* uses δ ⊙ m and the full-vocabulary
                        p_φ), and it never yields −inf. With μ = 0 it equals the adapter's score.
  "floor"               the decoding distribution (renormalised over the mask); a token outside
                        it scores ``floor_logprob`` (default log 1e-10 ≈ −23.03) instead of −inf,
                        so choices stay comparable and the number of such tokens is reported.
Every result also carries the unsteered adapter score (log p_φ) and the base score (log p_θ,
when the base pass ran), which come for free from the same forward passes.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch

from svd_ray.decoding.config import OUTSIDE_MASK_POLICIES, SteeringConfig
from svd_ray.decoding.dual import DualModel
from svd_ray.steering import form_steered_logits, plausibility_mask

DEFAULT_FLOOR_LOGPROB = math.log(1e-10)


@dataclass
class ChoiceScores:
    steered: list[float]
    adapter: list[float]
    base: list[float] | None
    num_tokens: list[int]
    outside_mask_tokens: list[int]
    token_logprobs: list[list[float]] = field(default_factory=list, repr=False)
    # per choice, per token: the ``top_logprobs`` most likely tokens of the same distribution, [(id, logprob)]
    top_logprobs: list[list[list[tuple[int, float]]]] | None = field(default=None, repr=False)

    def normalised(self, which: str = "steered") -> list[float]:
        """Softmax over choices of the summed log-likelihoods (probabilities that sum to 1)."""
        lls = torch.tensor(getattr(self, which), dtype=torch.float64)
        return torch.softmax(lls, 0).tolist()


def steered_logprobs(
    z_phi: torch.Tensor,
    z_theta: torch.Tensor | None,
    steering: SteeringConfig,
    outside_mask: str = "unmasked",
    floor_logprob: float = DEFAULT_FLOOR_LOGPROB,
    *,
    delta: torch.Tensor | None = None,
    inside: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p̂ over the whole vocabulary (..., V) under the mask policy, and the plausibility mask (None for
    ``off``, which has none). ``unmasked``: log_softmax(z_φ + μ·(δ ⊙ m)); ``floor``: the decoding distribution
    log_softmax(ẑ) inside the mask and ``floor_logprob`` outside. Always finite.

    ``delta`` / ``inside``: δ(z_φ, z_θ) and the mask at ``steering.alpha``, if already computed for these
    logits (scoring many variants of one forward pass); the result is the same."""
    if outside_mask not in OUTSIDE_MASK_POLICIES:
        raise ValueError(f"outside_mask must be one of {OUTSIDE_MASK_POLICIES}, got {outside_mask!r}")
    z = z_phi.float()
    if steering.mode == "off":
        return torch.log_softmax(z, -1), None
    if inside is None:
        inside = plausibility_mask(z, steering.alpha)
    steered = form_steered_logits(z, z_theta, mode=steering.mode, mu=steering.mu, alpha=steering.alpha,
                                  mean_delta=steering.mean_delta, outside="mask" if outside_mask == "floor" else "keep",
                                  delta=delta, mask=inside)
    logp = torch.log_softmax(steered, -1)
    if outside_mask == "floor":
        logp = logp.masked_fill(~inside, floor_logprob)
    return logp, inside


def steered_token_logprobs(
    z_phi: torch.Tensor,
    z_theta: torch.Tensor | None,
    targets: torch.Tensor,
    steering: SteeringConfig,
    outside_mask: str = "unmasked",
    floor_logprob: float = DEFAULT_FLOOR_LOGPROB,
    *,
    delta: torch.Tensor | None = None,
    inside: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p̂(target) at each position (..., V) → (...), and a bool tensor 'target outside mask'."""
    logp, inside = steered_logprobs(z_phi, z_theta, steering, outside_mask, floor_logprob, delta=delta, inside=inside)
    lp = logp.gather(-1, targets[..., None]).squeeze(-1)
    if inside is None:
        return lp, torch.zeros_like(targets, dtype=torch.bool)
    return lp, ~inside.gather(-1, targets[..., None]).squeeze(-1)


def top_logprobs(logp: torch.Tensor, k: int) -> list:
    """The ``k`` most likely tokens of each row of ``logp`` (..., V) as nested lists of (id, logprob)."""
    vals, ids = logp.topk(max(0, min(k, logp.shape[-1])), dim=-1)

    def pairs(i: list, v: list) -> list:
        if i and isinstance(i[0], list):
            return [pairs(a, b) for a, b in zip(i, v)]
        return list(zip(i, v))

    return pairs(ids.tolist(), vals.tolist())


def encode_choices(tokenizer, prompt: str, choices: list[str]) -> tuple[list[int], list[list[int]]]:
    """Token ids of the prompt and of each choice as it continues the prompt.

    Each choice is tokenised jointly with the prompt (prompt + choice) and split where the
    prompt's tokens end, so merges across the boundary follow the tokenizer; if the joint
    encoding does not start with the prompt's tokens, the choice is encoded on its own.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    out = []
    for choice in choices:
        joint = tokenizer(prompt + choice, add_special_tokens=True)["input_ids"]
        if joint[: len(prompt_ids)] == prompt_ids and len(joint) > len(prompt_ids):
            out.append(joint[len(prompt_ids) :])
        else:
            out.append(tokenizer(choice, add_special_tokens=False)["input_ids"])
        if not out[-1]:
            raise ValueError(f"choice {choice!r} encodes to no tokens")
    return prompt_ids, out


@dataclass
class ChoiceLogits:
    """Teacher-forced logits of every choice position: z[i, j] predicts choice i's token j."""

    z_phi: torch.Tensor  # (C, L, V)
    z_theta: torch.Tensor | None  # (C, L, V)
    tokens: torch.Tensor  # (C, L) right-padded
    valid: torch.Tensor  # (C, L) bool


class SharedPrefix:
    """A prompt prefix shared by many items (e.g. TruthfulQA's 6-shot primer), encoded once.

    ``choice_logits`` reuses it for every prompt whose token ids start with ``ids``: the
    prefix's KV caches are copied and only the rest of the prompt is encoded. Exact: the cached
    keys/values are those a full prefill would compute, because attention is causal.
    """

    def __init__(self, dual: DualModel, ids: list[int], with_base: bool = True):
        if not ids:
            raise ValueError("shared prefix must have at least one token")
        self.ids = list(ids)
        self.with_base = with_base
        tokens = torch.tensor([self.ids], device=dual.device)
        self.z_phi, self.z_theta, self.state = dual.prefill(tokens, with_base=with_base, last_only=True)
        self.paired = self.state.paired is not None  # a 2B-row cache cannot drop its base rows

    def applies_to(self, prompt_ids: list[int], with_base: bool) -> bool:
        n = len(self.ids)
        usable = with_base == self.with_base if self.paired else (self.with_base or not with_base)
        return usable and len(prompt_ids) >= n and prompt_ids[:n] == self.ids

    def encode(self, dual: DualModel, prompt_ids: list[int], with_base: bool):
        """(z_φ last, z_θ last, state) for the full prompt, from a copy of the prefix caches."""
        state = copy.deepcopy(self.state)
        if not with_base:
            state.base = None
        rest = prompt_ids[len(self.ids) :]
        if not rest:
            return self.z_phi, (self.z_theta if with_base else None), state
        tokens = torch.tensor([rest], device=dual.device)
        return dual.extend(state, tokens, last_only=True)


@torch.no_grad()
def choice_logits(
    dual: DualModel,
    prompt_ids: list[int],
    choice_ids: list[list[int]],
    with_base: bool = True,
    prefix: SharedPrefix | None = None,
) -> ChoiceLogits:
    """Encode the prompt once per branch, share its KV cache across all choices, teacher-force them.

    With ``prefix`` (a ``SharedPrefix`` the prompt starts with) only the prompt's remainder is encoded.
    """
    if not prompt_ids:
        raise ValueError("prompt must encode to at least one token")
    if not choice_ids or any(not c for c in choice_ids):
        raise ValueError("every choice must have at least one token")
    device = dual.device
    if prefix is not None and prefix.applies_to(prompt_ids, with_base):
        z_phi0, z_theta0, state = prefix.encode(dual, prompt_ids, with_base)
    else:
        ids = torch.tensor([prompt_ids], device=device)
        z_phi0, z_theta0, state = dual.prefill(ids, with_base=with_base, last_only=True)
    n = len(choice_ids)
    longest = max(len(c) for c in choice_ids)
    tokens = torch.zeros(n, longest, dtype=torch.long, device=device)
    valid = torch.zeros(n, longest, dtype=torch.bool, device=device)
    for i, c in enumerate(choice_ids):
        tokens[i, : len(c)] = torch.tensor(c, device=device)
        valid[i, : len(c)] = True
    # logits predicting choice token j: the prompt's last position for j = 0, else choice position j−1
    z_phi = z_phi0[:, -1:].expand(n, -1, -1)
    z_theta = None if z_theta0 is None else z_theta0[:, -1:].expand(n, -1, -1)
    if longest > 1:
        state = state.select_rows(torch.zeros(n, dtype=torch.long, device=device))
        zp, zt, _ = dual.extend(state, tokens[:, :-1], valid[:, :-1].long())
        z_phi = torch.cat([z_phi, zp], dim=1)
        z_theta = None if z_theta is None else torch.cat([z_theta, zt], dim=1)
    return ChoiceLogits(z_phi, z_theta, tokens, valid)


def scores_from_logits(
    cl: ChoiceLogits,
    steering: SteeringConfig,
    outside_mask: str = "unmasked",
    floor_logprob: float = DEFAULT_FLOOR_LOGPROB,
) -> ChoiceScores:
    """Per-choice log-likelihoods for one steering setting (cheap: no forward pass)."""
    steered_lp, outside = steered_token_logprobs(cl.z_phi, cl.z_theta, cl.tokens, steering, outside_mask, floor_logprob)
    adapter_lp = torch.log_softmax(cl.z_phi.float(), -1).gather(-1, cl.tokens[..., None]).squeeze(-1)
    base_lp = None
    if cl.z_theta is not None:
        base_lp = torch.log_softmax(cl.z_theta.float(), -1).gather(-1, cl.tokens[..., None]).squeeze(-1)
    zero = torch.zeros((), device=cl.tokens.device)

    def total(lp):
        return torch.where(cl.valid, lp, zero).sum(-1).tolist()

    lengths = cl.valid.sum(-1).tolist()
    return ChoiceScores(
        steered=total(steered_lp),
        adapter=total(adapter_lp),
        base=None if base_lp is None else total(base_lp),
        num_tokens=lengths,
        outside_mask_tokens=(outside & cl.valid).sum(-1).tolist(),
        token_logprobs=[steered_lp[i, :n].tolist() for i, n in enumerate(lengths)],
    )


def score_choice_ids(
    dual: DualModel,
    prompt_ids: list[int],
    choice_ids: list[list[int]],
    steering: SteeringConfig,
    outside_mask: str = "unmasked",
    floor_logprob: float = DEFAULT_FLOOR_LOGPROB,
    with_base: bool = True,
) -> ChoiceScores:
    """Teacher-forced log-likelihood of each choice after the prompt (token-id level)."""
    cl = choice_logits(dual, prompt_ids, choice_ids, with_base=with_base or steering.needs_base)
    return scores_from_logits(cl, steering, outside_mask, floor_logprob)


def score_choices(
    dual: DualModel,
    tokenizer,
    prompt: str,
    choices: list[str],
    steering: SteeringConfig,
    outside_mask: str = "unmasked",
    floor_logprob: float = DEFAULT_FLOOR_LOGPROB,
) -> ChoiceScores:
    """Text-level multiple-choice scoring (see the module docstring for the mask policy)."""
    if not choices:
        raise ValueError("choices must not be empty")
    prompt_ids, choice_ids = encode_choices(tokenizer, prompt, choices)
    return score_choice_ids(dual, prompt_ids, choice_ids, steering, outside_mask, floor_logprob)


class ChoiceTally:
    """Running per-choice sums of teacher-forced log-probabilities (steered, adapter, base), chunk by chunk."""

    def __init__(self, choice_ids: list[list[int]], steering: SteeringConfig, outside_mask: str = "unmasked",
                 floor_logprob: float = DEFAULT_FLOOR_LOGPROB, top_k: int = 0):
        n = len(choice_ids)
        self.num_tokens = [len(c) for c in choice_ids]
        self.steering, self.outside_mask, self.floor_logprob = steering, outside_mask, floor_logprob
        self.sums = {"steered": [0.0] * n, "adapter": [0.0] * n, "base": [0.0] * n}
        self.outside_counts = [0] * n
        self.token_lp: list[list[float]] = [[] for _ in range(n)]
        self.top_k = int(top_k)  # > 0: also keep the top_k alternatives of every scored position
        self.top_lp: list[list] | None = [[] for _ in range(n)] if self.top_k > 0 else None

    def add(self, idx: list[int], zp, zt, targets, valid) -> None:
        """Add the log-probs of ``targets`` (g, c) under logits (g, c, V) of choices ``idx`` (rows in order)."""
        logp, inside = steered_logprobs(zp, zt, self.steering, self.outside_mask, self.floor_logprob)
        steered = logp.gather(-1, targets[..., None]).squeeze(-1)
        outside = (torch.zeros_like(targets, dtype=torch.bool) if inside is None
                   else ~inside.gather(-1, targets[..., None]).squeeze(-1))
        if self.top_lp is not None:
            tops = top_logprobs(logp, self.top_k)
            for r, i in enumerate(idx):
                self.top_lp[i] += [t for t, v in zip(tops[r], valid[r].tolist()) if v]
        del logp
        adapter = torch.log_softmax(zp.float(), -1).gather(-1, targets[..., None]).squeeze(-1)
        base = None if zt is None else torch.log_softmax(zt.float(), -1).gather(-1, targets[..., None]).squeeze(-1)
        for r, i in enumerate(idx):
            v = valid[r]
            self.sums["steered"][i] += float(steered[r][v].sum())
            self.sums["adapter"][i] += float(adapter[r][v].sum())
            if base is not None:
                self.sums["base"][i] += float(base[r][v].sum())
            self.outside_counts[i] += int((outside[r] & v).sum())
            self.token_lp[i] += steered[r][v].tolist()

    def result(self, with_base: bool = True) -> ChoiceScores:
        return ChoiceScores(steered=self.sums["steered"], adapter=self.sums["adapter"],
                            base=self.sums["base"] if with_base else None, num_tokens=self.num_tokens,
                            outside_mask_tokens=self.outside_counts, token_logprobs=self.token_lp,
                            top_logprobs=self.top_lp)


def iter_choice_scores(
    dual,
    prompt_ids: list[int],
    choice_ids: list[list[int]],
    steering: SteeringConfig,
    outside_mask: str = "unmasked",
    floor_logprob: float = DEFAULT_FLOOR_LOGPROB,
    *,
    with_base: bool = True,
    max_rows: int = 8,
    chunk_tokens: int = 64,
):
    """``score_choice_ids`` with memory and time bounded by construction; a generator that yields after every
    forward and returns the ``ChoiceScores``.

    The prompt is encoded in chunks of ``chunk_tokens`` (once per branch); choices are teacher-forced in
    groups of at most ``max_rows`` rows (a choice takes one row per branch) and ``chunk_tokens`` positions
    at a time, and each chunk's logits are reduced to the few numbers the score needs before the next one
    is computed: at most max_rows × chunk_tokens × |V| logits exist at once, whatever the request.
    ``dual``: a ``DualModel`` or a ``FusedDual``.
    """
    if not prompt_ids:
        raise ValueError("prompt must encode to at least one token")
    if not choice_ids or any(not c for c in choice_ids):
        raise ValueError("every choice must have at least one token")
    if outside_mask not in OUTSIDE_MASK_POLICIES:
        raise ValueError(f"outside_mask must be one of {OUTSIDE_MASK_POLICIES}, got {outside_mask!r}")
    with_base = with_base or steering.needs_base
    device = dual.device
    branches = 2 if with_base else 1
    chunk_tokens = max(1, int(chunk_tokens))
    group = max(1, int(max_rows) // branches)

    first = torch.tensor([prompt_ids[:chunk_tokens]], device=device)
    z_phi0, z_theta0, state = dual.prefill(first, with_base=with_base, last_only=True)
    yield
    for j in range(chunk_tokens, len(prompt_ids), chunk_tokens):
        z_phi0, z_theta0, state = dual.extend(state, torch.tensor([prompt_ids[j:j + chunk_tokens]], device=device),
                                              last_only=True)
        yield
    z_phi0 = z_phi0[:, -1]
    z_theta0 = None if z_theta0 is None else z_theta0[:, -1]

    n = len(choice_ids)
    tally = ChoiceTally(choice_ids, steering, outside_mask, floor_logprob)
    account = tally.add

    for g0 in range(0, n, group):
        idx = list(range(g0, min(n, g0 + group)))
        g = len(idx)
        longest = max(len(choice_ids[i]) for i in idx)
        tokens = torch.zeros(g, longest, dtype=torch.long, device=device)
        valid = torch.zeros(g, longest, dtype=torch.bool, device=device)
        for r, i in enumerate(idx):
            tokens[r, : len(choice_ids[i])] = torch.tensor(choice_ids[i], device=device)
            valid[r, : len(choice_ids[i])] = True
        # token 0 of every choice is predicted by the prompt's last position
        account(idx, z_phi0.expand(g, -1)[:, None], None if z_theta0 is None else z_theta0.expand(g, -1)[:, None],
                tokens[:, :1], valid[:, :1])
        if longest == 1:
            continue
        last_group = g0 + group >= n  # DualModel's select_rows/extend mutate its caches: keep the prompt's
        st = (state if last_group else copy.deepcopy(state)).select_rows(torch.zeros(g, dtype=torch.long, device=device))
        for j in range(0, longest - 1, chunk_tokens):
            k = min(chunk_tokens, longest - 1 - j)
            zp, zt, st = dual.extend(st, tokens[:, j:j + k], valid[:, j:j + k].long())
            account(idx, zp, zt, tokens[:, j + 1:j + 1 + k], valid[:, j + 1:j + 1 + k])
            yield
    return tally.result(with_base)
