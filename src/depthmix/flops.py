"""FLOPs: counted on a real forward (torch FlopCounterMode) and estimated per block (docs/design.md §2)."""
from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

from .runtime import device_of, evaluating
from .tuners.mod.config import SKIP

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
    """FLOPs of one inference forward pass (no cache) on `ids`, else on random tokens; MoD in the given routing
    mode. Causal routing decides per token, so its count depends on the text: give real text for it."""
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


def block_shape(config) -> dict:
    """Hidden size, MLP width, heads and KV heads of a Llama-like or GPT-2 config."""
    d = getattr(config, "hidden_size", None) or config.n_embd
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    if getattr(config, "model_type", "") == "gpt2":
        inner = config.n_inner or 4 * d
        mlp_mats = 2
    else:
        inner = config.intermediate_size
        mlp_mats = 3  # gate, up, down
    return {"d": d, "inner": inner, "heads": heads, "kv_heads": kv, "head_dim": head_dim, "mlp_mats": mlp_mats}


def analytic(config, seq_len: int, layers: list[int], capacity: float, num_layers: int, vocab: int,
             predictor: bool = True, skip: str = "block") -> dict:
    """Per-token-sequence forward FLOPs (2 per multiply-add): dense blocks, routed blocks, routers/predictors, LM
    head. Returns both totals and the block-only ratio. In a routed block only what a token skips (MoDConfig.skip:
    "block", "attention" or "mlp") runs on the k routed tokens (linear parts x c, attention scores x c^2); the
    other sub-layer runs on every token at full cost."""
    if skip not in SKIP:
        raise ValueError(f"skip={skip!r}: expected 'block', 'attention' or 'mlp'")
    s = block_shape(config)
    d, hd = s["d"], s["head_dim"]
    attn_linear = 2 * seq_len * (d * hd * s["heads"] * 2 + d * hd * s["kv_heads"] * 2)  # q, o; k, v
    mlp_linear = 2 * seq_len * s["mlp_mats"] * d * s["inner"]
    attention = 2 * 2 * seq_len * seq_len * hd * s["heads"]  # QK^T and AV, full (non-causal) square as SDPA counts
    k = max(1, math.ceil(capacity * seq_len - 1e-9))
    c = k / seq_len
    routed = len(layers)
    h = math.ceil(d / 8)  # the predictor's hidden width (tuners.mod.layer.predictor_hidden)
    extra = routed * 2 * seq_len * (d + (d * h + h if predictor else 0))
    attn, mlp = attn_linear + attention, mlp_linear
    routed_attn = c * attn_linear + c * c * attention if skip in ("block", "attention") else attn
    routed_mlp = c * mlp_linear if skip in ("block", "mlp") else mlp
    dense_blocks = num_layers * (attn + mlp)
    mod_blocks = (num_layers - routed) * (attn + mlp) + routed * (routed_attn + routed_mlp)
    head = 2 * seq_len * d * vocab
    return {"dense": int(dense_blocks + head), "mod": int(mod_blocks + extra + head),
            "block_ratio": round(mod_blocks / dense_blocks, 4),
            "ratio": round((mod_blocks + extra + head) / (dense_blocks + head), 4), "k": k, "skip": skip}
