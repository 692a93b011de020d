"""FusedDual (adapter on and off in one forward over an AdapterBank) against DualModel over PEFT."""
import warnings

import pytest
import torch

from batching_helpers import VOCAB, task_adapter, tiny_base
from svd_ray.batching.adapters import AdapterBank
from svd_ray.batching.fused import FusedDual
from svd_ray.decoding import DualModel, GenerationConfig, SteeringConfig, generate, score_choice_ids
from svd_ray.models.peft_methods import PEFT_METHODS

warnings.filterwarnings("ignore")


@pytest.fixture(scope="module")
def setup():
    base = tiny_base()
    bank = AdapterBank(base)
    tasks = {}
    for i, m in enumerate(PEFT_METHODS):
        pm = task_adapter(base, m, seed=i)
        tasks[m] = (pm, bank.register(pm).slot)
    return base, bank, tasks


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_fused_prefill_equals_peft_dual(setup, method):
    _, bank, tasks = setup
    pm, slot = tasks[method]
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    ref_phi, ref_theta, _ = DualModel(pm).prefill(ids)
    z_phi, z_theta, _ = FusedDual(bank, slot).prefill(ids)
    torch.testing.assert_close(z_phi, ref_phi, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z_theta, ref_theta, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(z_phi, z_theta, atol=1e-3)


@pytest.mark.parametrize("method", PEFT_METHODS)
@pytest.mark.parametrize("mode", ["svdecode", "static", "off"])
def test_fused_generation_token_for_token(setup, method, mode):
    _, bank, tasks = setup
    pm, slot = tasks[method]
    ids = torch.randint(1, VOCAB, (3, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    steering = SteeringConfig(mode=mode, mu=2.0, alpha=0.1, mean_delta=torch.randn(VOCAB) * 0.1)
    gen = GenerationConfig(max_new_tokens=12)
    ref = generate(DualModel(pm), ids, mask, steering, gen)
    out = generate(FusedDual(bank, slot), ids, mask, steering, gen)
    assert [r.token_ids for r in out] == [r.token_ids for r in ref]


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_fused_beam_and_scores(setup, method):
    _, bank, tasks = setup
    pm, slot = tasks[method]
    steering = SteeringConfig(mode="svdecode", mu=1.5, alpha=0.1)
    ids = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(5))
    gen = GenerationConfig(max_new_tokens=6, num_beams=3)
    ref = generate(DualModel(pm), ids, None, steering, gen)
    out = generate(FusedDual(bank, slot), ids, None, steering, gen)
    assert [r.token_ids for r in out] == [r.token_ids for r in ref]
    prompt, choices = [3, 9, 14, 2], [[5], [7, 8, 9], [11, 12]]
    a = score_choice_ids(DualModel(pm), prompt, choices, steering)
    b = score_choice_ids(FusedDual(bank, slot), prompt, choices, steering)
    for x, y in zip(a.steered + a.adapter + a.base, b.steered + b.adapter + b.base):
        assert abs(x - y) < 1e-4


@pytest.mark.parametrize("method", PEFT_METHODS)
@pytest.mark.parametrize("outside", ["unmasked", "floor"])
def test_chunked_scores_equal_full_scores(setup, method, outside):
    from svd_ray.decoding.generate import run_to_end
    from svd_ray.decoding.scoring import iter_choice_scores

    _, bank, tasks = setup
    pm, slot = tasks[method]
    steering = SteeringConfig(mode="svdecode", mu=1.5, alpha=0.1)
    g = torch.Generator().manual_seed(9)
    prompt = torch.randint(1, VOCAB, (23,), generator=g).tolist()
    choices = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (1, 9, 4, 13, 2)]
    ref = score_choice_ids(DualModel(pm), prompt, choices, steering, outside)
    for dual in (DualModel(pm), FusedDual(bank, slot)):
        got = run_to_end(iter_choice_scores(dual, prompt, choices, steering, outside, max_rows=4, chunk_tokens=5))
        for key in ("steered", "adapter", "base"):
            assert got.__dict__[key] == pytest.approx(ref.__dict__[key], abs=1e-4)
        assert got.outside_mask_tokens == ref.outside_mask_tokens and got.num_tokens == ref.num_tokens
