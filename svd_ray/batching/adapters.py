"""Many tasks' adapters on ONE base model, chosen per batch row: the batching engine's model.

A batch row carries an adapter *slot* (``-1`` = no adapter: the base distribution p_θ). One forward
then serves rows of different tasks and methods, and a task's adapter-on and adapter-off rows, at once:

  lora     y_r = W x_r + s · B_k A_k x_r              for rows r of slot k (per-row kernel: rows grouped
                                                      by slot, ``index_add`` of each group's low-rank term)
  ia3      y_r = (W x_r) ⊙ l_k                        (attention / non-feed-forward modules)
           y_r = W (x_r ⊙ l_k)                        (feed-forward modules: the input is scaled)
  prompt_tuning  the row's input starts with the task's soft-prompt embeddings (virtual tokens)
  p_tuning_v2    the row's KV cache starts with the task's per-layer key/value prefix

These are PEFT's own formulas (``peft.tuners.lora.Linear.forward``, ``peft.tuners.ia3.Linear.forward``,
``PeftModelForCausalLM.forward`` for the prompt methods), applied with the tensors PEFT loaded, so a row
gets exactly what ``DualModel`` over the task's own ``PeftModel`` computes. Which rows use which slot is
set once per forward with :meth:`AdapterBank.rows`; modules not targeted by any row's adapter run as the
plain base layer.

The bank owns a module tree that shares every parameter tensor with the master base model (the wrappers
replace modules in that tree only), so registering a task costs its adapter tensors, not a model copy.
"""
from __future__ import annotations

import copy
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from svd_ray.models.peft_methods import PROMPT_METHODS

_PEFT_TYPE_TO_METHOD = {"LORA": "lora", "IA3": "ia3", "PROMPT_TUNING": "prompt_tuning", "PREFIX_TUNING": "p_tuning_v2"}


class UnsupportedAdapter(ValueError):
    """The adapter uses a PEFT feature the per-row kernels do not implement (refused at load, not at decode)."""


@dataclass
class _LinearAdapter:
    kind: str  # "lora" | "ia3"
    a: torch.Tensor | None = None  # lora_A weight (r, in)
    b: torch.Tensor | None = None  # lora_B weight (out, r)
    scale: float = 1.0
    l: torch.Tensor | None = None  # ia3 vector, flattened
    feedforward: bool = False


@dataclass
class AdapterEntry:
    """One registered task adapter: what a row of its slot adds to the base model."""

    slot: int
    method: str
    linear: dict[str, _LinearAdapter] = field(default_factory=dict)  # module name → per-module tensors
    soft_prompt: torch.Tensor | None = None  # prompt_tuning: (n, d)
    prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # p_tuning_v2: per layer (H, n, hd) K and V
    num_virtual: int = 0

    def nbytes(self) -> int:
        ts = [t for la in self.linear.values() for t in (la.a, la.b, la.l) if t is not None]
        if self.soft_prompt is not None:
            ts.append(self.soft_prompt)
        for k, v in self.prefix or []:
            ts += [k, v]
        return sum(t.numel() * t.element_size() for t in ts)


class _RowContext:
    """Which rows of the current forward use which slot (set by ``AdapterBank.rows``; one engine thread)."""

    def __init__(self):
        self.groups: list[tuple[int, torch.Tensor]] = []  # (slot, row indices) for slots ≥ 0


class RowAdapterLinear(torch.nn.Module):
    """A base Linear/Conv1D plus per-slot LoRA / IA3 terms applied to the rows of each slot only."""

    def __init__(self, base: torch.nn.Module, ctx: _RowContext):
        super().__init__()
        self.base = base
        self.ctx = ctx
        self.adapters: dict[int, _LinearAdapter] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = [(s, rows) for s, rows in self.ctx.groups if s in self.adapters]
        if not groups:
            return self.base(x)
        x_in = x
        ff = [(rows, self.adapters[s].l) for s, rows in groups
              if self.adapters[s].kind == "ia3" and self.adapters[s].feedforward]
        if ff:
            x_in = x.clone()
            for rows, l in ff:
                x_in[rows] = x[rows] * l.to(x.dtype)
        y = self.base(x_in)
        for s, rows in groups:
            a = self.adapters[s]
            if a.kind == "lora":
                xr = x[rows].to(a.a.dtype)
                y = y.index_add(0, rows, ((xr @ a.a.t()) @ a.b.t() * a.scale).to(y.dtype))
            elif not a.feedforward:  # ia3 on the output
                y = y.index_copy(0, rows, y[rows] * a.l.to(y.dtype))
        return y


class SkinnyLinear(torch.nn.Module):
    """``nn.Linear`` that computes few-row inputs as ``(W · xᵀ)ᵀ`` on the CPU.

    Decoding feeds a handful of rows per step. On CPU BLAS, ``x · Wᵀ`` with 2–8 rows runs a GEMM kernel
    that costs about twice the single-row GEMV, while ``W · xᵀ`` (the weight as the tall left operand)
    streams the weight once: measured on the 2-core machine, SmolLM2's 49,152 × 576 LM head at 2 rows
    takes ~18 ms one way and ~5 ms the other, and a whole decode step at 2 rows drops from ~85 ms to
    ~46 ms (bench/decode_overhead.py). Same math; only the summation order inside a dot product differs.
    """

    def __init__(self, base: torch.nn.Linear, max_rows: int):
        super().__init__()
        self.base, self.max_rows = base, max_rows
        self.weight, self.bias = base.weight, base.bias  # attributes other code looks up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.numel() // x.shape[-1] if x.numel() else 0
        if 0 < n <= self.max_rows and x.device.type == "cpu" and x.dtype == self.weight.dtype:
            y = torch.mm(self.weight, x.reshape(n, x.shape[-1]).t()).t()
            if self.bias is not None:
                y = y + self.bias
            return y.reshape(*x.shape[:-1], y.shape[-1])
        return self.base(x)


def _method_of(peft_model) -> str:
    cfg = peft_model.peft_config[peft_model.active_adapter]
    pt = str(cfg.peft_type.value)
    if pt not in _PEFT_TYPE_TO_METHOD:
        raise UnsupportedAdapter(f"PEFT type {pt} is not supported by the batching engine")
    return _PEFT_TYPE_TO_METHOD[pt]


def extract_adapter(peft_model, slot: int) -> AdapterEntry:
    """The tensors of ``peft_model``'s active adapter, keyed by module name relative to the base model.

    Tensors are shared with ``peft_model`` (no copy). Refuses (``UnsupportedAdapter``) any PEFT option
    whose forward differs from the formulas in the module docstring.
    """
    method = _method_of(peft_model)
    name = peft_model.active_adapter
    cfg = peft_model.peft_config[name]
    core = peft_model.get_base_model()
    entry = AdapterEntry(slot=slot, method=method)
    if getattr(cfg, "modules_to_save", None):
        raise UnsupportedAdapter("adapters with modules_to_save are not supported by the batching engine")
    if method in ("lora", "ia3"):
        for mod_name, mod in core.named_modules():
            if method == "lora" and hasattr(mod, "lora_A") and name in mod.lora_A:
                if mod.use_dora.get(name) or getattr(mod, "lora_bias", {}).get(name) or \
                        getattr(mod, "lora_variant", {}).get(name) is not None:
                    raise UnsupportedAdapter(f"{mod_name}: DoRA / LoRA bias / LoRA variants are not supported")
                entry.linear[mod_name] = _LinearAdapter(
                    "lora", a=mod.lora_A[name].weight.detach(), b=mod.lora_B[name].weight.detach(),
                    scale=float(mod.scaling[name]))
            elif method == "lora" and hasattr(mod, "lora_embedding_A") and name in mod.lora_embedding_A:
                raise UnsupportedAdapter(f"{mod_name}: LoRA on embeddings is not supported")
            elif method == "ia3" and hasattr(mod, "ia3_l") and name in mod.ia3_l:
                entry.linear[mod_name] = _LinearAdapter(
                    "ia3", l=mod.ia3_l[name].detach().flatten(), feedforward=bool(mod.is_feedforward))
        if not entry.linear:
            raise UnsupportedAdapter("the adapter targets no Linear module")
    else:
        entry.num_virtual = int(cfg.num_virtual_tokens)
        with torch.no_grad():
            prompt = peft_model.get_prompt(batch_size=1)
        if method == "prompt_tuning":
            entry.soft_prompt = prompt[0].detach()
        else:
            entry.prefix = [(layer.keys[0].detach(), layer.values[0].detach()) for layer in prompt.layers]
    return entry


def _module_parent(root: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), child


class AdapterBank:
    """A base model plus registered adapters; rows pick their slot per forward.

    ``model``: the *master* base model (never modified; its parameters are shared, not copied).
    """

    def __init__(self, model: torch.nn.Module, skinny_rows: int = 8):
        memo = {id(p): p for p in model.parameters()}
        self.model = copy.deepcopy(model, memo)  # same parameter tensors, own module objects
        self.model.eval()
        if skinny_rows > 0:  # few-row matmuls as W·xᵀ on the CPU (see SkinnyLinear)
            for name, mod in list(self.model.named_modules()):
                if type(mod) is torch.nn.Linear:
                    parent, child = _module_parent(self.model, name)
                    setattr(parent, child, SkinnyLinear(mod, skinny_rows))
        self._ctx = _RowContext()
        self._wrappers: dict[str, RowAdapterLinear] = {}
        self.entries: dict[int, AdapterEntry] = {}
        self._next_slot = 0
        self._lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def config(self):
        return self.model.config

    def register(self, peft_model) -> AdapterEntry:
        """Add ``peft_model``'s adapter under a new slot (its tensors are moved to this bank's device)."""
        with self._lock:
            slot = self._next_slot
            self._next_slot += 1
        entry = extract_adapter(peft_model, slot)
        dev = self.device
        for la in entry.linear.values():
            la.a = None if la.a is None else la.a.to(dev)
            la.b = None if la.b is None else la.b.to(dev)
            la.l = None if la.l is None else la.l.to(dev)
        if entry.soft_prompt is not None:
            entry.soft_prompt = entry.soft_prompt.to(dev)
        if entry.prefix is not None:
            entry.prefix = [(k.to(dev), v.to(dev)) for k, v in entry.prefix]
        for mod_name, la in entry.linear.items():
            wrapper = self._wrappers.get(mod_name)
            if wrapper is None:
                parent, child = _module_parent(self.model, mod_name)
                wrapper = RowAdapterLinear(getattr(parent, child), self._ctx)
                setattr(parent, child, wrapper)
                self._wrappers[mod_name] = wrapper
            wrapper.adapters[slot] = la
        self.entries[slot] = entry
        return entry

    def unregister(self, slot: int) -> None:
        entry = self.entries.pop(slot, None)
        if entry is None:
            return
        for mod_name in entry.linear:
            self._wrappers[mod_name].adapters.pop(slot, None)

    @contextmanager
    def rows(self, slots: torch.Tensor):
        """Within the block, row r of a forward uses adapter ``slots[r]`` (−1 = none)."""
        groups = []
        for s in torch.unique(slots).tolist():
            if s >= 0:
                groups.append((int(s), (slots == s).nonzero().flatten().to(self.device)))
        self._ctx.groups = groups
        try:
            yield
        finally:
            self._ctx.groups = []

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids)


def is_prompt_method(method: str | None) -> bool:
    return method in PROMPT_METHODS
