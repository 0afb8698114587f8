import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig
from torch import nn

import depthmix
from conftest import CAUSAL, LORA_TARGETS, batch, tiny
from depthmix.architectures import resolve

causal = pytest.mark.parametrize("family", CAUSAL)


def no_dropout(model):
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def mode(family, lora=True, dora=False, spread=True, targets=None, **kw):
    """A tiny MoDE model; spread=True gives router, norms and LoRA non-init values, so that each of them shows."""
    model = no_dropout(tiny(family))
    lora_cfg = None
    if lora:
        lora_cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_dora=dora,
                              target_modules=targets or LORA_TARGETS[family], fan_in_fan_out=family == "gpt2")
    dm = depthmix.apply(model, depthmix.MoDEConfig(**kw), lora=lora_cfg)
    if spread:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in dm.named_parameters():
                if name.startswith("method.router"):
                    p.copy_(torch.randn(p.shape, generator=g) * 3.0)
                elif name.startswith("method.norms"):
                    p.add_(torch.randn(p.shape, generator=g) * 0.3)
                elif "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return dm


def inputs(ids, mask, prompt=3):
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :prompt] = -100  # an instruction-style batch: the prompt is not scored
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
            "labels": labels}


def trainable(dm):
    return [(n, p) for n, p in dm.named_parameters() if p.requires_grad]


def naive_reference(dm, family, batch_inputs):
    """Forward once, then recompute the MoDE loss and logits naively from the blocks' outputs: k full
    vocabulary logit tensors, unchunked KL. Returns (model output, reference loss, reference logits)."""
    method, arch = dm.method, dm.arch
    outs = {}
    hooks = [arch.blocks[t].register_forward_hook(
        lambda mod, a, out, t=t: outs.__setitem__(t, out[0] if isinstance(out, tuple) else out))
        for t in method.layers]
    try:
        output = dm(**batch_inputs)
    finally:
        for h in hooks:
            h.remove()
    plain_norm = type(arch.norm)._depthmix_mixin_of.forward
    final = plain_norm(arch.norm, outs[method.layers[-1]])
    normed = [n(outs[t]) for n, t in zip(method.norms, method.layers[:-1])] + [final]
    logits = [dm.base_model.lm_head(n) for n in normed]
    if method.config.mixing == "token":
        w = method.router(final).softmax(-1)
    else:
        w = method.router_logits.softmax(-1).expand(*final.shape[:2], -1)
    ens = sum(w[..., i, None] * lg for i, lg in enumerate(logits))
    labels = batch_inputs["labels"]
    vocab = ens.shape[-1]
    ce = F.cross_entropy(ens[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=-100)
    keep = (labels[:, 1:] != -100).reshape(-1)
    tau = method.config.temperature
    teacher = (logits[-1][:, :-1].reshape(-1, vocab)[keep].detach() / tau).log_softmax(-1)
    kl = 0.0
    for lg in logits[:-1]:
        student = (lg[:, :-1].reshape(-1, vocab)[keep] / tau).log_softmax(-1)
        kl = kl + tau ** 2 * F.kl_div(student, teacher, log_target=True, reduction="sum") / keep.sum()
    return output, ce + method.config.distill_weight * kl, ens


def assert_same_loss_and_gradients(dm, loss, ref_loss):
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    params = [p for _, p in trainable(dm)]
    got = torch.autograd.grad(loss, params, retain_graph=True)
    want = torch.autograd.grad(ref_loss, params)
    for (name, _), a, b in zip(trainable(dm), got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


@causal
@pytest.mark.parametrize("mixing", ["token", "static"])
def test_gradients_reach_norms_router_and_adapter(family, mixing):
    dm = mode(family, mixing=mixing).train()
    ids, mask = batch(family)
    dm(**inputs(ids, mask)).loss.backward()
    for name, p in trainable(dm):
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@causal
def test_trainable_parameters_are_exactly_adapter_norms_router(family):
    dm = mode(family)
    names = {n for n, _ in trainable(dm)}
    method = {n for n in names if n.startswith("method.")}
    assert names - method and all("lora_" in n for n in names - method)
    per_norm = {"weight"} if family == "llama" else {"weight", "bias"}
    assert method == {f"method.norms.{i}.{w}" for i in range(2) for w in per_norm} | \
        {"method.router.weight", "method.router.bias"}
    assert set(dm.adapter_names) == names
    alone = mode(family, lora=False, mixing="static", num_layers=4, spread=False)
    assert {n for n, _ in trainable(alone)} == {f"method.norms.{i}.{w}" for i in range(3) for w in per_norm} | \
        {"method.router_logits"}
    # the norms start as copies of the final norm, in float32
    ref = alone.arch.norm.weight
    assert all(torch.equal(n.weight, ref) and n.weight.dtype == torch.float32 for n in alone.method.norms)


@causal
@pytest.mark.parametrize("mixing,head,chunk", [("token", "frozen", 4), ("static", "frozen", 12), ("token", "lora", 4)])
def test_chunked_loss_and_gradients_equal_the_naive_computation(family, mixing, head, chunk):
    # 17 labelled tokens: chunks of 4, or of 12 (split again into the fused path's 8-row steps); a LoRA-wrapped
    # head takes the checkpointed path, a frozen plain head the fused one
    targets = LORA_TARGETS[family] + ["lm_head"] if head == "lora" else None
    dm = mode(family, mixing=mixing, chunk_size=chunk, distill_weight=0.7, temperature=2.0, targets=targets).train()
    ids, mask = batch(family, b=3, s=9)
    batch_inputs = inputs(ids, mask)
    assert int((batch_inputs["labels"][:, 1:] != -100).sum()) == 17
    output, ref_loss, ref_logits = naive_reference(dm, family, batch_inputs)
    torch.testing.assert_close(output.logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert output.loss.item() > 0
    assert_same_loss_and_gradients(dm, output.loss, ref_loss)


@causal
def test_distillation_is_normalised_like_the_trainer_loss(family):
    """With num_items_in_batch (gradient accumulation in the HF Trainer) both CE and KL are sums over it."""
    dm = mode(family).train()
    ids, mask = batch(family)
    batch_inputs = inputs(ids, mask)
    n = int((batch_inputs["labels"][:, 1:] != -100).sum())
    mean = dm(**batch_inputs).loss
    half = dm(**batch_inputs, num_items_in_batch=torch.tensor(2 * n)).loss
    torch.testing.assert_close(half, mean / 2)
    dm.method.config.distill_weight = 0.0
    assert dm(**batch_inputs).loss < mean  # the KL term was really there


@causal
def test_untrained_model_stays_close_to_the_base_model(family):
    """At init every token has weights (eps/(k-1), ..., 1 - eps) with eps = 1 - init_final_weight, so
    |logits - base logits| <= eps * max_l |logits_l - logits_final|, far below what uniform weights give."""
    base = tiny(family)
    ids, mask = batch(family)
    kw = {"input_ids": ids, "attention_mask": mask}
    dm = mode(family, spread=False, init_final_weight=0.95)
    with torch.no_grad():
        want = base(**kw, output_hidden_states=True)
        got = dm(**kw).logits
        weights = dm.method.routing_weights(torch.randn(2, 5, dm.arch.norm.weight.shape[0]))
        # the layers' own logits (norm copies = the final norm at init)
        hidden = want.hidden_states  # embeddings, block outputs..., the last one after the final norm
        norm = resolve(base).norm  # the base model's own, unswapped
        per_layer = [base.lm_head(norm(hidden[t + 1])) for t in dm.method.layers[:-1]]
    torch.testing.assert_close(weights, torch.tensor([0.025, 0.025, 0.95]).expand(2, 5, 3))
    spread = max((lg - want.logits).abs().max() for lg in per_layer)
    diff = (got - want.logits).abs().max()
    assert spread > 0.02  # the layers really disagree
    assert diff <= 0.05 * spread + 1e-6


@causal
def test_save_load_round_trip_is_exact(family, tmp_path):
    dm = mode(family, dora=True).eval()
    ids, mask = batch(family)
    kw = {k: v for k, v in inputs(ids, mask).items() if k != "labels"}
    with torch.no_grad():
        before = dm(**kw).logits
    dm.save_pretrained(tmp_path)
    again = depthmix.DepthMixModel.from_pretrained(no_dropout(tiny(family)), tmp_path)
    with torch.no_grad():
        after = again(**kw).logits
    assert torch.equal(before, after)
    state = dm.adapter_state_dict()
    assert all(torch.equal(state[k], v) for k, v in again.adapter_state_dict().items())
    assert any("lora_magnitude_vector" in k for k in state)  # DoRA travelled too


@causal
def test_dora_composes(family):
    dm = mode(family, dora=True).train()
    ids, mask = batch(family)
    dm(**inputs(ids, mask)).loss.backward()
    names = {n for n, p in trainable(dm) if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("lora_magnitude_vector" in n for n in names)
    assert {"method.norms.0.weight", "method.norms.1.weight", "method.router.weight"} <= names


@causal
def test_cached_generate_equals_uncached(family):
    dm = mode(family).eval()
    ids, mask = batch(family, b=3, s=7)
    gen = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "pad_token_id": 0,
           "eos_token_id": None, "output_logits": True, "return_dict_in_generate": True}
    with torch.no_grad():
        cached = dm.generate(**gen, use_cache=True)
        full = dm.generate(**gen, use_cache=False)
        plain = no_dropout(tiny(family)).generate(**gen)
    assert torch.equal(cached.sequences, full.sequences)
    for a, b in zip(cached.logits, full.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # the ensemble, not the base model, decoded
    assert (cached.logits[0] - plain.logits[0]).abs().max() > 1e-3


@causal
def test_gradient_checkpointing_gives_the_same_gradients(family):
    ids, mask = batch(family)
    grads = []
    for ckpt in (None, True, False):
        dm = mode(family).train()
        if ckpt is not None:
            dm.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": ckpt})
        dm(**inputs(ids, mask)).loss.backward()
        grads.append({n: p.grad.clone() for n, p in trainable(dm)})
    for other in grads[1:]:
        assert other.keys() == grads[0].keys()
        for n in grads[0]:
            torch.testing.assert_close(other[n], grads[0][n], rtol=1e-4, atol=1e-7, msg=n)


@causal
def test_bad_config_values_are_named(family):
    for field, value in (("num_layers", 1), ("mixing", "layer"), ("distill_weight", -1.0), ("temperature", 0),
                         ("init_final_weight", 1.0), ("chunk_size", 0), ("num_layers", True)):
        with pytest.raises(depthmix.ConfigError, match=f"MoDEConfig.{field}"):
            depthmix.MoDEConfig(**{field: value})
    with pytest.raises(depthmix.ConfigError, match="num_layers = 5"):
        depthmix.apply(tiny(family), depthmix.MoDEConfig(num_layers=5))


def test_encoders_are_refused():
    with pytest.raises(depthmix.UnsupportedModelError, match="causal LM"):
        depthmix.apply(tiny("bert"), depthmix.MoDEConfig())


def test_cli_flags_build_the_config():
    from depthmix.cli.main import build_parser
    from depthmix.cli.train import train_options
    args = build_parser().parse_args(["train", "--method", "mode", "--no-lora", "--num-layers", "4", "--mixing",
                                      "static", "--temperature", "2", "--use-dora"])
    opts = train_options(args)
    assert not opts.lora and opts.use_dora
    assert depthmix.MoDEConfig.from_dict(opts.method_config) == depthmix.MoDEConfig(
        num_layers=4, mixing="static", temperature=2.0)


@causal
@pytest.mark.parametrize("head", ["frozen", "lora"])
def test_sync_free_path_equals_the_naive_computation(family, head):
    """The accelerator's path (every row, unlabelled rows weighted 0) gives the same loss and gradients."""
    targets = LORA_TARGETS[family] + ["lm_head"] if head == "lora" else None
    dm = mode(family, chunk_size=5, distill_weight=0.7, temperature=2.0, targets=targets).train()
    dm.method.compact_on_cpu = False
    batch_inputs = inputs(*batch(family))
    output, ref_loss, _ = naive_reference(dm, family, batch_inputs)
    assert_same_loss_and_gradients(dm, output.loss, ref_loss)


def test_training_step_adds_no_host_sync_to_the_dense_model():
    from syncs import count_syncs

    def step(dm):
        batch_inputs = inputs(*batch("llama"))
        return lambda: dm(**batch_inputs).loss.backward()

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS["llama"])
    dense = count_syncs(step(depthmix.apply(tiny("llama"), None, lora=lora).train()))
    dm = mode("llama").train()
    dm.method.compact_on_cpu = False
    assert count_syncs(step(dm)) == dense
    dm.method.compact_on_cpu = True  # the CPU path compacts the labelled rows: one nonzero, which the count sees
    assert count_syncs(step(dm)) - dense == {"aten.nonzero": 1}


@causal
def test_mean_reduction_divides_the_distillation_by_the_shallower_layers(family):
    batch_inputs = inputs(*batch(family))
    losses = {}
    for reduction in ("sum", "mean"):
        for weight in (0.0, 1.0):
            dm = mode(family, num_layers=3, distill_weight=weight, distill_reduction=reduction).train()
            losses[reduction, weight] = dm(**batch_inputs).loss
    kl_sum = losses["sum", 1.0] - losses["sum", 0.0]
    assert kl_sum > 0
    torch.testing.assert_close(losses["mean", 1.0] - losses["mean", 0.0], kl_sum / 2)


@causal
def test_distilling_into_the_norms_leaves_the_backbone_gradient_alone(family):
    batch_inputs = inputs(*batch(family))
    grads = {}
    for weight in (0.0, 1.0):
        dm = mode(family, distill_weight=weight, distill_into="norms").train()
        dm(**batch_inputs).loss.backward()
        grads[weight] = {n: p.grad.clone() for n, p in trainable(dm)}
    lora = [n for n in grads[0.0] if "lora_" in n]
    norms = [n for n in grads[0.0] if n.startswith("method.norms")]
    assert lora and norms
    for n in lora:
        torch.testing.assert_close(grads[1.0][n], grads[0.0][n], msg=n)
    assert any(not torch.allclose(grads[1.0][n], grads[0.0][n]) for n in norms)
