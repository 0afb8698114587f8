"""FLOPs counted on a real forward (torch FlopCounterMode); a method's own estimate from the model's shape lives in
its folder (docs/design.md §2)."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

from .runtime import device_of, evaluating

aten = torch.ops.aten


def _register_cpu_sdpa() -> None:
    """PyTorch counts SDPA only for its CUDA kernels: on a CPU the fused kernel would count as zero FLOPs."""
    from torch.utils.flop_counter import flop_registry
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if fwd is not None and fwd.default not in flop_registry and fwd not in flop_registry:
        register_flop_formula(fwd)(lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v))
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if bwd is not None and bwd.default not in flop_registry and bwd not in flop_registry:
        register_flop_formula(bwd)(
            lambda g, q, k, v, *a, out_shape=None, **kw: sdpa_backward_flop_count(g, q, k, v))


_register_cpu_sdpa()


def count(fn) -> int:
    """FLOPs of what fn() really runs (matmuls and attention; elementwise work is not counted)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def forward_flops(model, batch: int, seq_len: int, routing: str | None = None, seed: int = 0, ids=None) -> int:
    """FLOPs of one inference forward pass (no cache) on `ids`, else on random tokens; the method in the given
    routing mode (one of its `routings`). Routing decided per token depends on the text: give real text for it."""
    device = device_of(model)
    if ids is None:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=g)
    ids = ids.to(device)
    method = getattr(model, "method", None)
    with evaluating(model), torch.no_grad():
        if routing and method is not None and method.routings:
            with method.routing_mode(routing):
                return count(lambda: model(input_ids=ids, use_cache=False))
        return count(lambda: model(input_ids=ids, use_cache=False))
