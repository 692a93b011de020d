"""The four PEFT warm-start methods, built in one place with the paper's settings as defaults.

  lora            r=8, alpha=16, dropout=0.1 on q,k,v,o
  ia3             q,k,v,o + MLP up/down (down is the "feed-forward" module: IA3 scales its input)
  prompt_tuning   20 virtual tokens (soft prompt prepended to the input embeddings)
  p_tuning_v2     20 virtual tokens of per-layer key/value prefixes, produced by a 2-layer MLP
                  reparameterisation with hidden size 128 (PEFT's PrefixTuning + prefix_projection)

Module names are chosen per architecture family: Llama-style (Llama, Gemma, Qwen, Mistral:
``q_proj … down_proj``) and GPT-2-style (``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``).
The base distribution p_θ is always "the same model with the adapter disabled":
``disable_adapter()`` for LoRA/IA3, no virtual tokens / no prefix for the prompt methods.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

PEFT_METHODS = ("lora", "ia3", "prompt_tuning", "p_tuning_v2")
PROMPT_METHODS = ("prompt_tuning", "p_tuning_v2")

_LLAMA_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
_LLAMA_MLP = ["up_proj", "down_proj"]
_GPT2_ATTN = ["attn.c_attn", "attn.c_proj"]
_GPT2_MLP = ["mlp.c_fc", "mlp.c_proj"]


@dataclass
class PeftSettings:
    """Hyperparameters of one PEFT method (defaults = the paper's)."""

    method: str = "lora"
    r: int = 8
    lora_alpha: int = 16
    dropout: float = 0.1
    num_virtual_tokens: int = 20
    encoder_hidden_size: int = 128
    target_modules: list[str] | None = None  # override the per-architecture defaults
    feedforward_modules: list[str] | None = None  # IA3 only
    extra: dict = field(default_factory=dict)  # passed through to the PEFT config

    def __post_init__(self) -> None:
        if self.method not in PEFT_METHODS:
            raise ValueError(f"peft.method must be one of {PEFT_METHODS}, got {self.method!r}")
        if self.r <= 0 or self.num_virtual_tokens <= 0 or self.encoder_hidden_size <= 0:
            raise ValueError("peft.r, peft.num_virtual_tokens and peft.encoder_hidden_size must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"peft.dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)


def is_prompt_method(method: str) -> bool:
    return method in PROMPT_METHODS


def architecture_family(model) -> str:
    return "gpt2" if getattr(model.config, "model_type", "") == "gpt2" else "llama"


def peft_config(settings: PeftSettings, model):
    """The PEFT config object for ``settings`` on ``model``'s architecture."""
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType

    family = architecture_family(model)
    attn, mlp = (_GPT2_ATTN, _GPT2_MLP) if family == "gpt2" else (_LLAMA_ATTN, _LLAMA_MLP)
    if settings.method == "lora":
        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=settings.r,
            lora_alpha=settings.lora_alpha,
            lora_dropout=settings.dropout,
            target_modules=settings.target_modules or attn,
            fan_in_fan_out=family == "gpt2",
            **settings.extra,
        )
    if settings.method == "ia3":
        return IA3Config(
            task_type=TaskType.CAUSAL_LM,
            target_modules=settings.target_modules or attn + mlp,
            feedforward_modules=settings.feedforward_modules or [mlp[1]],
            fan_in_fan_out=family == "gpt2",
            **settings.extra,
        )
    if settings.method == "prompt_tuning":
        return PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=settings.num_virtual_tokens, **settings.extra
        )
    return PrefixTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=settings.num_virtual_tokens,
        encoder_hidden_size=settings.encoder_hidden_size,
        prefix_projection=True,
        **settings.extra,
    )


def build_peft_model(model, settings: PeftSettings, adapter_name: str = "default"):
    """Wrap ``model`` with a freshly initialised adapter (trainable params only in the adapter)."""
    from peft import get_peft_model

    return get_peft_model(model, peft_config(settings, model), adapter_name=adapter_name)


def load_peft_model(model, adapter_dir: str, adapter_name: str = "default"):
    """Attach a saved adapter (``save_pretrained`` folder) to ``model`` for inference."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, adapter_dir, adapter_name=adapter_name)
    peft_model.eval()
    return peft_model
