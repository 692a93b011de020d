"""Base models and PEFT adapters."""
from svd_ray.models.registry import ModelRef, load_base_model, load_tokenizer, model_fingerprint, resolve_model
from svd_ray.models.peft_methods import PEFT_METHODS, PeftSettings, build_peft_model, is_prompt_method

__all__ = [
    "ModelRef",
    "load_base_model",
    "load_tokenizer",
    "model_fingerprint",
    "resolve_model",
    "PEFT_METHODS",
    "PeftSettings",
    "build_peft_model",
    "is_prompt_method",
]
