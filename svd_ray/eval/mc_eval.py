"""Score multiple-choice items under several steering variants from ONE pair of forward passes.

The adapter-on and adapter-off logits of every choice position are computed once per prompt
(``choice_logits``); each variant (PEFT baseline, SVDecode, ablations) is then a cheap
function of those logits, sharing δ and the plausibility mask. This keeps ablation tables honest:
every variant sees exactly the same model outputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from svd_ray.data import MCItem
from svd_ray.decoding import SharedPrefix, SteeringConfig, choice_logits, encode_choices, scores_from_logits
from svd_ray.decoding.scoring import steered_token_logprobs
from svd_ray.steering import plausibility_mask, steering_vector


@dataclass(frozen=True)
class Variant:
    """How one column of a results table scores choices."""

    name: str
    source: str  # "base" (adapter off) | "adapter" (plain φ) | "steered"
    steering: SteeringConfig | None = None
    outside_mask: str = "unmasked"


def validated_variant(validation: dict, alpha: float) -> Variant:
    """How a task with the validated μ̄ is served: steered at its μ̄, or its fallback — the plain adapter
    (``off``) or μ = 0 inside the mask (``mask_only``, scored with the decoding distribution)."""
    if validation["steer"]:
        return Variant("validated", "steered", SteeringConfig("svdecode", float(validation["mu"]), alpha))
    if validation.get("fallback") == "mask_only":
        return Variant("validated", "steered", SteeringConfig("svdecode", 0.0, alpha), "floor")
    return Variant("validated", "adapter")


def standard_variants(mu: float, alpha: float, mean_delta: torch.Tensor | None = None, estimates: dict | None = None,
                      validation: dict | None = None):
    """Base, PEFT, SVDecode at ``mu`` (both mask policies), the validated μ̄'s serving choice, and the
    ablations the method doc asks for."""
    out = [
        Variant("base", "base"),
        Variant("peft", "adapter"),
        Variant("svdecode", "steered", SteeringConfig("svdecode", mu, alpha)),
        Variant("svdecode_floor", "steered", SteeringConfig("svdecode", mu, alpha), "floor"),
        Variant("mask_only", "steered", SteeringConfig("svdecode", 0.0, alpha), "floor"),
        Variant("no_mask", "steered", SteeringConfig("svdecode", mu, 0.0)),
    ]
    if mean_delta is not None:
        out.append(Variant("static", "steered", SteeringConfig("static", mu, alpha, mean_delta)))
    if validation is not None:
        out.append(validated_variant(validation, alpha))
    for name, value in (estimates or {}).items():
        if name == "validated":  # its serving choice is the "validated" variant above
            continue
        out.append(Variant(f"svdecode_mu_{name}", "steered", SteeringConfig("svdecode", float(value), alpha)))
    return out


def prompt_groups(items: list[MCItem]) -> list[list[int]]:
    """Indices of ``items`` grouped by prompt, groups in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for n, item in enumerate(items):
        groups.setdefault(item.prompt, []).append(n)
    return list(groups.values())


def _variant_sums(cl, variants: list[Variant]) -> dict[str, tuple[list[float], list[int]]]:
    """Every steered variant's per-choice log-likelihood and count of scored tokens outside the mask, from
    one ``ChoiceLogits``. The terms all variants share (δ, the mask at each α) are computed once; each
    variant's log p̂ is the same tensor ``scores_from_logits`` would give it."""
    z = cl.z_phi.float()
    delta = None
    masks: dict[float, torch.Tensor] = {}
    zero = torch.zeros((), device=cl.tokens.device)
    out = {}
    for v in variants:
        if v.source != "steered":
            continue
        st = v.steering
        if st.mode == "svdecode" and delta is None:
            delta = steering_vector(z, cl.z_theta)
        if st.alpha not in masks:
            masks[st.alpha] = plausibility_mask(z, st.alpha)
        lp, outside = steered_token_logprobs(z, cl.z_theta, cl.tokens, st, v.outside_mask,
                                             delta=delta if st.mode == "svdecode" else None, inside=masks[st.alpha])
        out[v.name] = (torch.where(cl.valid, lp, zero).sum(-1).tolist(), (outside & cl.valid).sum(-1).tolist())
    return out


def pick_from(indices: list[int]):
    """values → [values[k] for k in indices]: one item's choices out of its prompt group's union."""
    return lambda values: [values[k] for k in indices]


@torch.inference_mode()
def score_items(
    dual, tokenizer, items: list[MCItem], variants: list[Variant], progress=None, prefix: SharedPrefix | None = None
) -> list[dict]:
    """For each item: {"id", "source", "labels", "choices", "num_tokens", variant → per-choice log-likelihoods}.

    Items with the same prompt (TruthfulQA's MC1 and MC2 of one question: every MC1 choice is also an MC2
    choice) are scored together: one pair of forward passes over the union of their choices. A choice's
    score depends only on the prompt and the choice (teacher forcing), so each item gets the numbers it
    would get alone. ``prefix``: a shared prompt prefix (few-shot primer) encoded once and reused.
    """
    rows: list[dict | None] = [None] * len(items)
    done = 0
    for group in prompt_groups(items):
        prompt = items[group[0]].prompt
        union = list(dict.fromkeys(c for n in group for c in items[n].choices))
        prompt_ids, choice_ids = encode_choices(tokenizer, prompt, union)
        cl = choice_logits(dual, prompt_ids, choice_ids, with_base=True, prefix=prefix)
        plain = scores_from_logits(cl, SteeringConfig(mode="off"))
        steered = _variant_sums(cl, variants)
        del cl
        at = {c: k for k, c in enumerate(union)}
        for n in group:
            item = items[n]
            pick = [at[c] for c in item.choices]
            sel = pick_from(pick)
            row = {"id": item.id, "source": item.source, "labels": list(item.labels), "choices": list(item.choices),
                   "base": sel(plain.base), "peft": sel(plain.adapter), "num_tokens": sel(plain.num_tokens)}
            for v in variants:
                if v.source == "adapter" and v.name != "peft":  # a variant that serves the plain adapter
                    row[v.name] = row["peft"]
                if v.source != "steered":
                    continue
                lls, outside = steered[v.name]
                row[v.name] = sel(lls)
                row[f"{v.name}__outside_mask_tokens"] = sel(outside)
            rows[n] = row
            done += 1
            if progress is not None:
                progress(done, len(items))
    return rows
