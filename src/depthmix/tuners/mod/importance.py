"""Which blocks matter: ShortGPT's block influence on calibration text, and removing whole blocks.

Block influence (Men et al. 2024, "ShortGPT", arXiv 2403.03853): BI = 1 - mean over tokens of cos(x_in, x_out)
of a block's input and output hidden states; a block that barely turns its input has a low score. The same
score for the attention and MLP sub-layers of a pre-norm block (the hidden state between them is the input of
the block's second norm: Llama's post_attention_layernorm, GPT-2's ln_2).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...config import ConfigError
from ...architectures import _get, resolve
from ...runtime import device_of

MID_NORMS = ("post_attention_layernorm", "ln_2")


def _output(out) -> torch.Tensor:
    return out if torch.is_tensor(out) else out[0]


@torch.no_grad()
def influence(model, ids: torch.Tensor, batch: int = 4) -> dict[str, list[float]]:
    """{"block": [BI per block], "attention": [...], "mlp": [...]} on token blocks `ids` [N, S] (no padding);
    the sub-layer lists are absent where a block has no recognised middle norm."""
    blocks = resolve(model).blocks
    n = len(blocks)
    sums = {k: torch.zeros(n, dtype=torch.float64) for k in ("block", "attention", "mlp")}
    count = [0]
    state: dict[int, dict[str, torch.Tensor]] = {}

    def cos_gap(a, b):
        return float((1 - F.cosine_similarity(a.float(), b.float(), dim=-1)).sum())

    def pre(i):
        return lambda m, a, kw: state.setdefault(i, {}).update(x=(a[0] if a else kw["hidden_states"]))

    def post(i):
        def hook(m, a, kw, out):
            y, s = _output(out), state.pop(i)
            sums["block"][i] += cos_gap(s["x"], y)
            if "h" in s:
                sums["attention"][i] += cos_gap(s["x"], s["h"])
                sums["mlp"][i] += cos_gap(s["h"], y)
        return hook

    def mid(i):
        return lambda m, a: state[i].update(h=a[0])

    hooks = []
    for i, block in enumerate(blocks):
        hooks.append(block.register_forward_pre_hook(pre(i), with_kwargs=True))
        hooks.append(block.register_forward_hook(post(i), with_kwargs=True))
        norm = next((getattr(block, name) for name in MID_NORMS if hasattr(block, name)), None)
        if norm is not None:
            hooks.append(norm.register_forward_pre_hook(mid(i)))
    device = device_of(model)
    was = model.training
    model.eval()
    try:
        for start in range(0, len(ids), batch):
            chunk = ids[start:start + batch].to(device)
            model(input_ids=chunk, use_cache=False)
            count[0] += chunk.numel()
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    out = {k: [float(v) / count[0] for v in s] for k, s in sums.items()}
    if not sums["attention"].any():
        del out["attention"], out["mlp"]
    return out


def block_influence(model, ids: torch.Tensor, batch: int = 4) -> list[float]:
    """ShortGPT's block influence of every block on token blocks `ids` [N, S]."""
    return influence(model, ids, batch)["block"]


def least_important(scores: list[float], n: int, exclude=(0,)) -> list[int]:
    """The n blocks of lowest score (sorted by index), never one of `exclude` (block 0: MoD cannot route it while
    decoding with a KV cache, and it is the most important block of every model measured)."""
    order = sorted((i for i in range(len(scores)) if i not in exclude), key=lambda i: scores[i])
    if not 0 <= n <= len(order):
        raise ConfigError(f"least_important: n = {n}, expected 0..{len(order)}")
    return sorted(order[:n])


def drop_blocks(model: nn.Module, drop) -> nn.Module:
    """Remove blocks `drop` from `model` in place (the block list, each kept attention's layer_idx for the KV
    cache, the config's layer count and per-layer types) and return it."""
    arch = resolve(model)
    drop = set(int(i) for i in drop)
    bad = sorted(i for i in drop if not 0 <= i < arch.num_layers)
    if bad or len(drop) >= arch.num_layers:
        raise ConfigError(f"drop_blocks: {sorted(drop)} for a model with {arch.num_layers} blocks")
    kept = nn.ModuleList(b for i, b in enumerate(arch.blocks) if i not in drop)
    parent, _, name = arch.blocks_path.rpartition(".")
    setattr(_get(model, parent) if parent else model, name, kept)
    for j, block in enumerate(kept):
        for m in block.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = j
    cfg = model.config
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(cfg, key):
            setattr(cfg, key, len(kept))
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [t for i, t in enumerate(cfg.layer_types) if i not in drop]
    return model


class DroppedAttention(nn.Module):
    """Stands in for a removed attention sub-layer: its residual branch adds nothing and nothing is computed (no
    K/V is kept either). Returns what Llama's and GPT-2's attention modules return: (output, weights)."""

    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states), None


ATTENTION_NAMES = ("self_attn", "attn")


def drop_attention(model: nn.Module, drop) -> nn.Module:
    """Remove the attention sub-layer of blocks `drop` in place (each replaced by DroppedAttention; the MLPs stay)
    and return the model: the attention-drop baseline ("What Matters in Transformers", arXiv 2406.15786). A plain
    Hugging Face checkpoint cannot express it (Llama's config has no per-layer "no attention"; `layer_types` only
    chooses among kinds of attention), so such a model lives in memory only: save_pretrained is refused."""
    arch = resolve(model)
    drop = sorted(set(int(i) for i in drop))
    if any(not 0 < i < arch.num_layers for i in drop):
        raise ConfigError(f"drop_attention: {drop} for a model with {arch.num_layers} blocks (block 0 keeps its "
                          "attention: the model reads its KV cache length there)")
    for i in drop:
        block = arch.blocks[i]
        name = next((n for n in ATTENTION_NAMES if isinstance(getattr(block, n, None), nn.Module)), None)
        if name is None:
            raise ConfigError(f"drop_attention: block {i} ({type(block).__name__}) has no attention sub-layer named "
                              f"one of {ATTENTION_NAMES}")
        setattr(block, name, DroppedAttention())

    def refuse(*args, **kwargs):
        raise ConfigError("drop_attention: a model without some attention sub-layers has no plain Hugging Face "
                          "checkpoint (its config cannot say which blocks lack attention; loading it would give "
                          "them new random weights)")
    model.save_pretrained = refuse
    return model
