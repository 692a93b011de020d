"""The engine on the real SmolLM2-135M for each PEFT method (integration: loads ~540 MB of weights).

For every method: steered generation runs and moves away from the adapter's output when μ is
large; with μ = 0 and the mask off it equals plain adapter decoding token for token, checked
against an independent reference (PEFT's own ``generate`` for LoRA/IA3, PEFT's own uncached
forward for the prompt methods, whose ``generate`` is unreliable on transformers 5.24).
"""
import copy
import warnings

import pytest
import torch

from svd_ray.decoding import DualModel, GenerationConfig, SteeringConfig, generate, score_choices
from svd_ray.models import build_peft_model, load_base_model, load_tokenizer, resolve_model
from svd_ray.models.peft_methods import PEFT_METHODS, PeftSettings

pytestmark = pytest.mark.integration
warnings.filterwarnings("ignore")

PROMPTS = ["Q: What is 3 + 4?\nA:", "The capital of France is"]


@pytest.fixture(scope="module")
def smollm2():
    ref = resolve_model("smollm2-135m")
    return load_base_model(ref), load_tokenizer(ref)


def _adapted(base, method):
    torch.manual_seed(0)
    model = build_peft_model(copy.deepcopy(base), PeftSettings(method=method))
    with torch.no_grad():  # a deterministic stand-in for a warm-start: move the adapter off identity
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def _naive_greedy(model, ids, steps):
    seq = ids
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=seq).logits[:, -1]
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    return seq[:, ids.shape[1] :].tolist()


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_smollm2_steered_generation_and_neutral_equivalence(smollm2, method):
    base, tok = smollm2
    model = _adapted(base, method)
    dual = DualModel(model)
    steps = 8
    gen = GenerationConfig(max_new_tokens=steps)
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        neutral = generate(dual, ids, None, SteeringConfig("svdecode", mu=0.0, alpha=0.0), gen)[0].token_ids
        plain = generate(dual, ids, None, SteeringConfig("off"), gen)[0].token_ids
        assert neutral == plain
        if method in ("lora", "ia3"):
            with torch.no_grad():
                ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                                     min_new_tokens=steps, do_sample=False, pad_token_id=tok.pad_token_id)
            reference = ref[:, ids.shape[1] :].tolist()[0]
        else:
            reference = _naive_greedy(model, ids, steps)[0]
        assert plain == reference, (method, prompt)
        steered = generate(dual, ids, None, SteeringConfig("svdecode", mu=1.0, alpha=0.1), gen)[0].token_ids
        assert len(steered) == steps and all(0 <= t < len(tok) for t in steered)
    # a very large strength must change the output somewhere (δ ≠ 0 because the adapter is active)
    ids = tok(PROMPTS[0], return_tensors="pt")["input_ids"]
    z_phi, z_theta, _ = dual.prefill(ids, last_only=True)
    assert (z_phi - z_theta).abs().max() > 1e-3
    scores = score_choices(dual, tok, PROMPTS[0], [" 7", " 8", " seven"], SteeringConfig("svdecode", 1.0, 0.1))
    assert all(torch.isfinite(torch.tensor(scores.steered)))
    assert scores.base is not None and scores.steered != scores.adapter
