"""Operator calls of MoD and of the same dense model, per phase: what the routing adds, counted, not timed.

Each routed block adds small operators (router, predictor, top-k, gather, scatter, masks) that cost launches on a
GPU and dispatch time on a CPU. Their number does not depend on the machine's load, so it measures a change to the
routing code where a timing on a busy machine cannot. The model is built from a config: SmolLM2-135M's shape
(30 blocks, grouped-query attention 9/3 heads, tied embeddings) at a small width by default (operator counts depend
on the structure, not the width). Phases: a top-k forward (training's routing), a forward+backward training step,
a causal forward of a batch (what scoring runs), and greedy generate at batch 1 and at --decode-batch (prefill and
decoding steps). Counts are aten operator calls at every level, from torch.profiler.
"""
from __future__ import annotations

import torch

from ..depthmix_model import apply
from ..flags import add_dataclass_flags, pick
from ..tuners import MoDConfig
from .latency import MOD_FLAGS

METHOD = "mod"  # the method this benchmark measures


def add_args(p) -> None:
    p.add_argument("--hidden", type=int, default=72, help="hidden size of the SmolLM2-shaped model (576 is the "
                   "real one; a multiple of 9 heads x 2)")
    p.add_argument("--num-layers", type=int, default=30, help="blocks (SmolLM2-135M: 30)")
    add_dataclass_flags(p, MoDConfig, group="MoD options", only=MOD_FLAGS)
    p.add_argument("--batch-size", type=int, default=2, help="sequences of the forward and training phases")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence of the forward and training phases")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens of the generate phases")
    p.add_argument("--new-tokens", type=int, default=8, help="tokens generated in the generate phases")
    p.add_argument("--decode-batch", type=int, default=4, help="batch of the second generate phase")


def smollm2_shaped(hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    if hidden % 18:
        raise ValueError(f"--hidden {hidden}: expected a multiple of 18 (9 heads of an even width)")
    cfg = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                      num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3,
                      max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def count_ops(fn) -> int:
    """aten operator calls at every level during fn()."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def phases(model, args, mod: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size if not mod else model.base_model.config.vocab_size
    ids = torch.randint(3, vocab, (args.batch_size, args.seq_len), generator=g)
    prompt1 = torch.randint(3, vocab, (1, args.prompt_len), generator=g)
    prompt = torch.randint(3, vocab, (args.decode_batch, args.prompt_len), generator=g)
    method = model.method if mod else None

    def forward(routing):
        def fn():
            with torch.no_grad():
                if method is None:
                    return model(input_ids=ids, use_cache=False)
                with method.routing_mode(routing):
                    return model(input_ids=ids, use_cache=False)
        return fn

    def train():
        model.train()
        try:
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        finally:
            model.zero_grad(set_to_none=True)
            model.eval()

    def generate(p):
        def fn():
            with torch.no_grad():
                model.generate(p, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                               pad_token_id=0, attention_mask=torch.ones_like(p))
        return fn

    todo = {"forward_topk": forward("topk"), "train_step": train, "forward_causal": forward("causal"),
            "generate_b1": generate(prompt1), f"generate_b{args.decode_batch}": generate(prompt)}
    for fn in todo.values():  # a first call: lazy initialisation is not what is counted
        fn()
    return {name: count_ops(fn) for name, fn in todo.items()}


def run(args) -> dict:
    config = MoDConfig(**pick(args, MOD_FLAGS), update="retrofit")
    torch.manual_seed(0)
    dense = smollm2_shaped(args.hidden, args.num_layers)
    for p in dense.parameters():
        p.requires_grad_(True)
    torch.manual_seed(0)
    mod = apply(smollm2_shaped(args.hidden, args.num_layers), config)
    for p in mod.parameters():
        p.requires_grad_(True)
    counts = {"dense": phases(dense, args, False), "mod": phases(mod, args, True)}
    routed = len(mod.method.layers)
    extra = {k: counts["mod"][k] - counts["dense"][k] for k in counts["dense"]}
    result = {"bench": "ops", "shape": f"SmolLM2-135M shape, hidden {args.hidden}, {args.num_layers} blocks",
              "capacity": config.capacity, "layers": mod.method.layers, "skip": config.skip, "counts": counts,
              "mod_minus_dense": extra,
              "per_routed_block": {k: round(v / routed, 1) for k, v in extra.items()},
              "torch": torch.__version__}
    for k in counts["dense"]:
        print(f"{k:<16} dense {counts['dense'][k]:>7}  MoD {counts['mod'][k]:>7}  "
              f"extra per routed block {result['per_routed_block'][k]:>7}")
    return result
