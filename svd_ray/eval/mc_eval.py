"""Score multiple-choice items under several steering variants from ONE pair of forward passes.

The adapter-on and adapter-off logits of every choice position are computed once per item
(``choice_logits``); each variant (PEFT baseline, SVDecode, ablations) is then a cheap
function of those logits. This keeps ablation tables honest: every variant sees exactly the
same model outputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from svd_ray.data import MCItem
from svd_ray.decoding import SharedPrefix, SteeringConfig, choice_logits, encode_choices, scores_from_logits


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


@torch.inference_mode()
def score_items(
    dual, tokenizer, items: list[MCItem], variants: list[Variant], progress=None, prefix: SharedPrefix | None = None
) -> list[dict]:
    """For each item: {"id", "source", "labels", "choices", "num_tokens", variant → per-choice log-likelihoods}.

    ``prefix``: a shared prompt prefix (few-shot primer) encoded once and reused.
    """
    rows = []
    for n, item in enumerate(items):
        prompt_ids, choice_ids = encode_choices(tokenizer, item.prompt, item.choices)
        cl = choice_logits(dual, prompt_ids, choice_ids, with_base=True, prefix=prefix)
        row = {"id": item.id, "source": item.source, "labels": list(item.labels), "choices": list(item.choices)}
        plain = scores_from_logits(cl, SteeringConfig(mode="off"))
        row["base"], row["peft"] = plain.base, plain.adapter
        row["num_tokens"] = plain.num_tokens
        for v in variants:
            if v.source == "adapter" and v.name != "peft":  # a variant that serves the plain adapter
                row[v.name] = plain.adapter
            if v.source != "steered":
                continue
            s = scores_from_logits(cl, v.steering, v.outside_mask)
            row[v.name] = s.steered
            row[f"{v.name}__outside_mask_tokens"] = s.outside_mask_tokens
        rows.append(row)
        if progress is not None:
            progress(n + 1, len(items))
    return rows
