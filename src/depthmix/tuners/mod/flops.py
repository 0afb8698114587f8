"""MoD's FLOPs estimated per block, from the model's shape (docs/design.md §2): what `depthmix flops` and
`depthmix bench mod` set beside the FLOPs counted on a real forward (depthmix.flops)."""
from __future__ import annotations

import math

from ... import flops
from .config import SKIP
from .layer import predictor_hidden


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
    "block", "attention", "mlp", or "sublayers": both, each with its own router) runs on the k routed tokens
    (linear parts x c, attention scores x c^2); the other sub-layer runs on every token at full cost."""
    if skip not in SKIP:
        raise ValueError(f"skip={skip!r}: expected one of {SKIP}")
    s = block_shape(config)
    d, hd = s["d"], s["head_dim"]
    attn_linear = 2 * seq_len * (d * hd * s["heads"] * 2 + d * hd * s["kv_heads"] * 2)  # q, o; k, v
    mlp_linear = 2 * seq_len * s["mlp_mats"] * d * s["inner"]
    attention = 2 * 2 * seq_len * seq_len * hd * s["heads"]  # QK^T and AV, full (non-causal) square as SDPA counts
    k = max(1, math.ceil(capacity * seq_len - 1e-9))
    c = k / seq_len
    routed = len(layers)
    h = predictor_hidden(d)
    units = routed * (2 if skip == "sublayers" else 1)
    extra = units * 2 * seq_len * (d + (d * h + h if predictor else 0))
    attn, mlp = attn_linear + attention, mlp_linear
    routed_attn = c * attn_linear + c * c * attention if skip in ("block", "attention", "sublayers") else attn
    routed_mlp = c * mlp_linear if skip in ("block", "mlp", "sublayers") else mlp
    dense_blocks = num_layers * (attn + mlp)
    mod_blocks = (num_layers - routed) * (attn + mlp) + routed * (routed_attn + routed_mlp)
    head = 2 * seq_len * d * vocab
    return {"dense": int(dense_blocks + head), "mod": int(mod_blocks + extra + head),
            "block_ratio": round(mod_blocks / dense_blocks, 4),
            "ratio": round((mod_blocks + extra + head) / (dense_blocks + head), 4), "k": k, "skip": skip}


def report(model, dense_flops: int, batch_size: int, seq_len: int, seed: int, trained: bool) -> tuple[dict, str]:
    """`depthmix flops` for MoD: top-k and causal forward FLOPs on random tokens against the dense model's, the
    realized causal capacity and why it differs from the asked one, and the analytic estimate."""
    method, config = model.method, model.method_config
    counted = {"dense": dense_flops}
    for key, routing in (("mod_topk", "topk-lookahead"), ("mod_causal", "causal")):
        method.reset_stats()
        counted[key] = flops.forward_flops(model, batch_size, seq_len, routing, seed=seed)
    realized = method.summary().get("realized_capacity")
    why = (f"what this adapter's trained {config.causal} lets through on random tokens" if trained else
           f"what an untrained {config.causal} (seed {seed}) lets through, not a trained router's share; "
           "pass --adapter for a trained one")
    shape = model.base_model.config
    est = analytic(shape, seq_len, method.layers, config.capacity, model.arch.num_layers, shape.vocab_size,
                   predictor=config.causal == "predictor", skip=config.skip)
    result = {
        "capacity": config.capacity, "skip": config.skip,
        "layers": method.layers, "seq_len": seq_len, "batch_size": batch_size,
        "counted": counted, "flop_ratio": round(counted["mod_topk"] / counted["dense"], 4),
        "flop_ratio_causal": round(counted["mod_causal"] / counted["dense"], 4),
        "realized_capacity_causal": realized, "realized_capacity_note": why, "seed": seed,
        "analytic_per_sequence": est,
    }
    line = (f"dense {counted['dense']:.4e} FLOPs/forward, MoD top-k {counted['mod_topk']:.4e} "
            f"({result['flop_ratio']:.3f}x; analytic {est['ratio']:.3f}x, blocks only {est['block_ratio']:.3f}x), "
            f"MoD causal {counted['mod_causal']:.4e} ({result['flop_ratio_causal']:.3f}x at realized capacity "
            f"{realized}, asked {config.capacity}: {why})")
    return result, line
