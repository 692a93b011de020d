"""Multiple-choice scoring for the evaluation: items sharing a prompt are scored in one pass over the union of
their choices, variants share δ and the mask; every number must equal scoring each item and variant alone."""
import warnings

import pytest
import torch

from svd_ray.data import MCItem
from svd_ray.decoding import DualModel, SharedPrefix, SteeringConfig, choice_logits, encode_choices, scores_from_logits
from svd_ray.eval.mc_eval import score_items, standard_variants
from svd_ray.models.peft_methods import PEFT_METHODS

from decoding.test_decoding import tiny_peft

warnings.filterwarnings("ignore")
ALPHABET = "abcdefghijklmnopqrstuvwxyz .?!,:ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"  # 67 symbols, vocab 70


class CharTokenizer:
    """One token per character, a BOS (id 69) when special tokens are asked for."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([69] if add_special_tokens else []) + [ALPHABET.index(c) for c in text]}


def peaked(model, scale: float = 6.0):
    """A random tiny model is near uniform (its plausibility mask keeps every token); sharpen its logits so the
    mask, and with it the floor and no-mask variants, matter."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)
    return model


def items():
    primer = "Q: why is the sky blue? A: light scatters. "  # a shared few-shot primer
    qa = [("Q: is ice cold?", [" yes", " no", " maybe so"], [" yes", " very", " no", " maybe so", " hot"]),
          ("Q: what is two?", [" a number", " Two!", " blue"], [" blue", " a number", " Two!", " x"])]
    out = []
    for k, (q, mc1, mc2) in enumerate(qa):
        out.append(MCItem(id=f"q{k}", prompt=primer + q + " A:", choices=mc1, labels=[1] + [0] * (len(mc1) - 1),
                          source="mc1"))
        out.append(MCItem(id=f"q{k}", prompt=primer + q + " A:", choices=mc2, labels=[1, 1] + [0] * (len(mc2) - 2),
                          source="mc2"))
    out.append(MCItem(id="alone", prompt="Z: odd one out?", choices=[" A", " BB"], labels=[0, 1], source="other"))
    return out


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_score_items_equals_each_item_and_variant_scored_alone(method):
    torch.manual_seed(0)
    dual, tok = DualModel(peaked(tiny_peft(method, vocab=70))), CharTokenizer()
    variants = standard_variants(-3.0, 0.1, torch.randn(70) * 0.3, {"mean": -3.0, "median": 2.0},
                                 {"steer": True, "mu": 1.5})
    its = items()
    prefix = SharedPrefix(dual, tok(its[0].prompt)["input_ids"][:20])
    order = [3, 0, 4, 2, 1]  # MC1 and MC2 of a question need not be adjacent
    rows = score_items(dual, tok, [its[i] for i in order], variants, prefix=prefix)
    assert [(r["source"], r["id"]) for r in rows] == [(its[i].source, its[i].id) for i in order]
    steered = [v for v in variants if v.source == "steered"]
    assert {"svdecode", "svdecode_floor", "mask_only", "no_mask", "static", "validated"} <= {v.name for v in steered}
    for r, i in zip(rows, order):
        item = its[i]
        prompt_ids, choice_ids = encode_choices(tok, item.prompt, item.choices)
        cl = choice_logits(dual, prompt_ids, choice_ids, with_base=True)  # alone, no shared prefix
        plain = scores_from_logits(cl, SteeringConfig(mode="off"))
        assert r["choices"] == item.choices and r["num_tokens"] == [len(c) for c in choice_ids]
        torch.testing.assert_close(r["base"], plain.base, rtol=0, atol=1e-4)
        torch.testing.assert_close(r["peft"], plain.adapter, rtol=0, atol=1e-4)
        for v in steered:
            ref = scores_from_logits(cl, v.steering, v.outside_mask)
            torch.testing.assert_close(r[v.name], ref.steered, rtol=0, atol=1e-4, msg=v.name)
            assert r[f"{v.name}__outside_mask_tokens"] == ref.outside_mask_tokens, v.name
    # the variants differ (svdecode_mu_mean is svdecode's μ), so one scored with another's δ or mask is caught
    distinct = {tuple(round(x, 4) for r in rows for x in r[v.name]) for v in steered if v.name != "svdecode_mu_mean"}
    assert len(distinct) == len(steered) - 1


def test_score_items_falls_back_to_the_plain_adapter_when_validation_says_so():
    dual, tok = DualModel(tiny_peft("lora", vocab=70)), CharTokenizer()
    variants = standard_variants(-3.0, 0.1, None, {}, {"steer": False, "fallback": "off"})
    rows = score_items(dual, tok, items()[:2], variants)
    assert all(r["validated"] == r["peft"] and "validated__outside_mask_tokens" not in r for r in rows)
