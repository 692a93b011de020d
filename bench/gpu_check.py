"""Engine checks on an accelerator: the CPU test-suite's equivalences, re-run on CUDA.

    python bench/gpu_check.py     # prints one line per check; exit 1 on any mismatch

For each PEFT method on a tiny random-init Llama on the GPU: cached steered decoding equals
re-encoding the whole prefix every step; prefill equals PEFT's forward; MC scores equal
full-sequence teacher forcing; δ on the GPU equals δ on the CPU.
"""
import importlib.util
import sys
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
root = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("td", root / "tests" / "decoding" / "test_decoding.py")
td = importlib.util.module_from_spec(spec)
spec.loader.exec_module(td)

from svd_ray.decoding import DualModel, GenerationConfig, SteeringConfig, generate, score_choice_ids  # noqa: E402
from svd_ray.steering import steering_vector  # noqa: E402


def main() -> int:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {dev} {torch.cuda.get_device_name() if dev.type == 'cuda' else ''} torch {torch.__version__}")
    failures = 0
    for method in ("lora", "ia3", "prompt_tuning", "p_tuning_v2"):
        model = td.tiny_peft(method).to(dev)
        dual = DualModel(model)
        ids = torch.randint(0, 61, (3, 7), generator=torch.Generator().manual_seed(2)).to(dev)
        steering = SteeringConfig("svdecode", mu=1.5, alpha=0.1)
        got = [r.token_ids for r in generate(dual, ids, None, steering, GenerationConfig(max_new_tokens=10))]
        ref = td.reference_generate(dual, ids, steering, 10).tolist()
        with torch.no_grad():
            full = model(input_ids=ids).logits[:, -7:]
        z_phi, _, _ = dual.prefill(ids)
        prefill_err = float((z_phi - full).abs().max())
        s = score_choice_ids(dual, [5, 9, 12], [[7], [8, 2, 40]], steering)
        seq = torch.tensor([[5, 9, 12, 8, 2, 40]], device=dev)
        zp, zt = dual.teacher_forced_logits(seq)
        lp = torch.log_softmax(zp[0, 2:5] + 1.5 * td.masked_steering_vector(zp[0, 2:5], zt[0, 2:5], 0.1), -1)
        ref_ll = float(lp[torch.arange(3), torch.tensor([8, 2, 40], device=dev)].sum())
        ok = got == ref and prefill_err < 1e-4 and abs(s.steered[1] - ref_ll) < 1e-3
        failures += not ok
        print(f"{method:<14} cached==uncached {got == ref}  prefill max|Δ| {prefill_err:.2e}  "
              f"score |Δ| {abs(s.steered[1] - ref_ll):.2e}  {'OK' if ok else 'MISMATCH'}")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 49152, generator=g) * 3, torch.randn(4, 49152, generator=g) * 3
    err = float((steering_vector(a.to(dev), b.to(dev)).cpu() - steering_vector(a.double(), b.double())).abs().max())
    print(f"δ fp32 on {dev} vs fp64 CPU, |V| = 49152: max|Δ| {err:.2e}")
    failures += err > 1e-5
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
