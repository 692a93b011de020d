"""Decode-time cost of SVDecode vs plain adapter decoding, side by side in one run, for all four methods.

Generated tokens per second (greedy) for
    hf        PEFT's own ``peft_model.generate`` (the outside anchor; LoRA / IA3 only — for the prompt
              methods PEFT's generate does not reproduce PEFT's forward, see docs/ARCHITECTURE.md)
    off       plain adapter decoding through ``DualModel`` (one forward per token)
    svdecode  ``DualModel``: two sequential cached forwards per token (adapter on, adapter off) + δ
    f-off     the batching engine's ``FusedDual`` without the base rows (adapter only)
    f-svd     ``FusedDual``: adapter on and off as ONE forward of 2B rows + δ   ← what serving runs
and prints the per-token time of fused SVDecode relative to adapter-only decoding (``f-svd`` vs the
faster of ``off`` and ``f-off``).

    python bench/decode_overhead.py                       # SmolLM2-135M weights (CPU or GPU)
    python bench/decode_overhead.py --random-init         # SmolLM2's architecture, random weights
Weights do not change the cost of a forward pass, so --random-init timings are representative.
"""
from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def smollm2_architecture():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
        rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
    )
    return LlamaForCausalLM(cfg)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    from svd_ray.batching import AdapterBank, FusedDual
    from svd_ray.decoding import DualModel, GenerationConfig, SteeringConfig, generate
    from svd_ray.models import build_peft_model
    from svd_ray.models.peft_methods import PeftSettings

    ap = argparse.ArgumentParser()
    ap.add_argument("--random-init", action="store_true")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--methods", default="lora,ia3,prompt_tuning,p_tuning_v2")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    if args.random_init:
        master = smollm2_architecture()
        source = "SmolLM2-135M architecture, random init"
    else:
        from svd_ray.models import load_base_model, resolve_model

        master = load_base_model(resolve_model("smollm2-135m"))
        source = "SmolLM2-135M weights"
    master = master.to(device=device, dtype=dtype).eval()
    for p in master.parameters():
        p.requires_grad_(False)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"# decode overhead — {source}; device {device} ({where}); torch {torch.__version__}; dtype {args.dtype}; "
          f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, best of {args.repeats}")
    cols = ["hf", "off", "svdecode", "f-off", "f-svd"]
    print(f"{'method':<14}{'batch':>6}" + "".join(f"{c + ' tok/s':>15}" for c in cols)
          + f"{'svdecode/off':>14}{'f-svd/f-off':>13}{'f-svd time vs adapter-only':>28}")
    bank = AdapterBank(master)
    for method in args.methods.split(","):
        tree = copy.deepcopy(master, {id(p): p for p in master.parameters()})
        model = build_peft_model(tree, PeftSettings(method=method)).to(device=device, dtype=dtype).eval()
        dual = DualModel(model)
        fused = FusedDual(bank, bank.register(model).slot)
        vocab = master.config.vocab_size
        off = SteeringConfig("off")
        svd = SteeringConfig("svdecode", mu=0.5, alpha=0.1)
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            ids = torch.randint(1, vocab, (bs, args.prompt_len), device=device)
            gen = GenerationConfig(max_new_tokens=args.new_tokens)  # no EOS: every row makes every token

            def hf_generate():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                     min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
                return bs * (out.shape[1] - ids.shape[1])

            runs = {
                "hf": hf_generate if method in ("lora", "ia3") else None,
                "off": lambda: sum(len(r.token_ids) for r in generate(dual, ids, None, off, gen)),
                "svdecode": lambda: sum(len(r.token_ids) for r in generate(dual, ids, None, svd, gen)),
                "f-off": lambda: sum(len(r.token_ids) for r in generate(fused, ids, None, off, gen)),
                "f-svd": lambda: sum(len(r.token_ids) for r in generate(fused, ids, None, svd, gen)),
            }
            with torch.inference_mode():  # warm-up: allocator, kernels, caches
                generate(fused, ids, None, svd, GenerationConfig(max_new_tokens=2))
                generate(dual, ids, None, svd, GenerationConfig(max_new_tokens=2))
            rates = {}
            for name, fn in runs.items():
                if fn is None:
                    continue
                best = 0.0
                for _ in range(args.repeats):
                    _sync(device)
                    t0 = time.perf_counter()
                    with torch.inference_mode():
                        n = fn()
                    _sync(device)
                    best = max(best, n / (time.perf_counter() - t0))
                rates[name] = best
            adapter_only = max(rates["off"], rates["f-off"])
            cells = "".join(f"{rates[c]:>15.1f}" if c in rates else f"{'–':>15}" for c in cols)
            print(f"{method:<14}{bs:>6}{cells}{rates['svdecode'] / rates['off']:>14.2f}"
                  f"{rates['f-svd'] / rates['f-off']:>13.2f}{adapter_only / rates['f-svd']:>27.2f}×")
        del model, dual, fused


if __name__ == "__main__":
    main()
