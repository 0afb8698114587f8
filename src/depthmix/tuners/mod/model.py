"""MoD wired into a model: routers, causal predictors, one gather -> block (or sub-layer) -> scatter per routed
block."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...blocks import CACHE_ARG, take_rows_all
from ...config import ConfigError, pick_layers
from ...sharding import attach_spares, must_call
from ..base import Method, float32_linear
from .cache import KEY, PackedView, store_for
from .gate import budget_loss, executed_fraction, gate_values, new_router, router_input
from .layer import (MoDBlock, attn_impl, first_real, flat_positions, membership, pack, packed_mask, predictor_hidden,
                    selected_slots, subset_mask, take_packed, take_slots, topk_membership, topk_slots)

# the sub-layers of a block, by family: each called on the normed hidden state, returning its residual branch
SUBLAYERS = {"llama": {"attention": "self_attn", "mlp": "mlp"}, "gpt2": {"attention": "attn", "mlp": "mlp"}}
ROUTING = ("auto", "causal", "topk-lookahead")
ALIASES = {"topk": "topk-lookahead"}  # the old name: explicit top-k, in training and out of it


@dataclass
class Call:
    """One routed call of unit i (a block or one of its sub-layers), as route() decided it."""
    module: nn.Module
    i: int
    kind: str  # "block", "attention" or "mlp"
    forward: Callable  # the module's own forward
    x: torch.Tensor  # [B, S, d] its hidden-state input
    named: dict  # its other arguments, by name
    valid: torch.Tensor  # [B, S] real tokens
    sel: torch.Tensor  # [B, S] the tokens it processes
    r: torch.Tensor | None  # [B, S] router logits (None in a decoding step: computed for the rows that process)
    cache: Any  # the KV cache, or None
    slots: tuple | None  # top-k routing: (idx [B, K], count [B], K) of the selected tokens; None: causal routing


class MoD(Method):
    """routing:
    - "auto" (default): per-sequence top-k by router score while training (the model and its method in train
      mode), causal routing whenever not (eval forward, scoring, lm-eval, generate).
    - "causal": each token decides alone from its own hidden state (what generation does), always.
    - "topk-lookahead": top-k even outside training, for studies only: a token's routing then depends on the
      tokens after it, so teacher-forced scores see the future ("topk" is accepted as its old name).
    generate() always routes causally."""

    routings = ROUTING
    compared_routings = ("causal", "topk-lookahead")

    def __init__(self, config, arch, hidden_size: int):
        super().__init__(config, arch)
        if not arch.causal:
            raise ConfigError(f"MoDConfig: MoD routes tokens of causal LMs; {arch.family.name} is an encoder")
        self.layers = pick_layers(config.layers, arch.num_layers, "MoDConfig.layers")
        # the routed units: (block, what it routes), two per block where both sub-layers are routed apart
        kinds = ("attention", "mlp") if config.skip == "sublayers" else (config.skip,)
        self.units = [(t, kind) for t in self.layers for kind in kinds]
        self.routers = nn.ModuleList(new_router(config, hidden_size) for _ in self.units)
        if config.causal == "predictor":
            h = predictor_hidden(hidden_size)
            self.predictors = nn.ModuleList(
                nn.Sequential(float32_linear(hidden_size, h), nn.SiLU(), float32_linear(h, 1)) for _ in self.units)
        self._routing = "auto"
        self._valid = None
        self._full = False  # this forward has no padding (begin)
        self.progress = 0.0  # fraction of training done: anneals the gate's temperature (update="gated")
        self._executed = []  # (executed fraction, unit) of this forward's gated units, for the budget loss
        self.reset_stats()
        for i, (t, kind) in enumerate(self.units):
            self.wrap(self._target(arch, t, kind), MoDBlock, i)
        self._costs = [sum(p.numel() for p in module.parameters()) for module in self._swapped]

    def _target(self, arch, t: int, kind: str) -> nn.Module:
        """The module that routed block t routes: the block, or its attention or MLP sub-layer (config.skip)."""
        block = arch.blocks[t]
        if kind == "block":
            return block
        names = SUBLAYERS.get(arch.family.name)
        if names is None:
            raise ConfigError(f"MoDConfig.skip={self.config.skip!r}: routing a sub-layer is supported for the "
                              f"families {sorted(SUBLAYERS)}, not {arch.family.name}")
        name = names[kind]
        sub = getattr(block, name, None)
        if not isinstance(sub, nn.Module):
            raise ConfigError(f"MoDConfig.skip={self.config.skip!r}: block {t} ({type(block).__name__}) of the "
                              f"{arch.family.name} family has no `{name}` sub-layer")
        return sub

    def routed_module(self, i: int) -> nn.Module:
        """The module routed as unit i, self.units[i] (a block or one of its sub-layers)."""
        return self._swapped[i]

    def unit_name(self, i: int) -> str:
        """How statistics name unit i: its block ("7"), with the sub-layer where both are routed ("7.mlp")."""
        t, kind = self.units[i]
        return f"{t}.{kind}" if self.config.skip == "sublayers" else str(t)

    def begin(self, inputs: dict) -> None:
        super().begin(inputs)
        self._valid = None
        self._executed = []
        # no row has padding, where knowing it costs no device read (no mask, or one in host memory, read through
        # numpy): top-k routing then takes fewer operations to pick the same slots
        mask = self.inputs.get("attention_mask")
        self._full = mask is None or (torch.is_tensor(mask) and mask.dim() == 2 and mask.device.type == "cpu"
                                      and bool(mask.detach().numpy().all()))

    def finish(self, output):
        if self._executed:
            self.add_aux(budget_loss(self.config, self._executed, self._costs))
            self._executed = []
        return super().finish(output)

    def valid_mask(self, hidden: torch.Tensor) -> torch.Tensor:
        """As Method.valid_mask, computed once per forward (every routed block asks for the same one)."""
        if self._valid is None or self._valid.shape != hidden.shape[:2]:
            self._valid = super().valid_mask(hidden)
        return self._valid

    # -- modes and statistics ---------------------------------------------------------------------------------
    @property
    def routing(self) -> str:
        return self._routing

    @routing.setter
    def routing(self, value: str) -> None:
        value = ALIASES.get(value, value)
        if value not in ROUTING:
            raise ConfigError(f"MoD routing = {value!r}: expected one of {ROUTING}")
        self._routing = value

    def active_routing(self, training: bool) -> str:
        """"topk-lookahead" or "causal": what a forward uses, in training or not."""
        if self._routing == "auto":
            return "topk-lookahead" if training else "causal"
        return self._routing

    def eval_routing(self) -> str:
        return self.active_routing(False)

    @contextlib.contextmanager
    def routing_mode(self, value: str):
        old, self.routing = self.routing, value
        try:
            yield self
        finally:
            self._routing = old

    def generating(self, decoding):
        decoding.refuse("MoD", "its per-block KV stores cannot take tokens back")
        if decoding.static and self.config.skip == "mlp":
            raise ConfigError("MoD generate(): skip='mlp' with a static cache is not supported (a routed MLP, never "
                              "handed the cache, tells a decoding step by the 2D attention mask, which a static "
                              "cache replaces with prepared 4D masks); leave cache_implementation unset")
        return self.routing_mode("causal")

    def training_loss(self, model, inputs: dict, progress: float):
        if self.config.retrofit_loss is None:
            return None
        from .retrofit import retrofit_loss
        return retrofit_loss(model, inputs, self.config.retrofit_loss, progress)

    def after_training(self, model, dataset):
        """update="gated" with threshold decisions: the budget loss pulls the executed fraction toward the target
        only as hard as its weight, so the gates' thresholds are set on (up to) 8 training sequences, cut to the
        shortest of them, as retrofit.calibrate_gates does."""
        if self.config.update != "gated" or self.config.causal != "threshold" or len(dataset) == 0:
            return None
        from .retrofit import calibrate_gates
        rows = dataset[:8]["input_ids"]
        n = min(len(r) for r in rows)
        return calibrate_gates(model, torch.tensor([list(r[:n]) for r in rows]))

    def flop_report(self, model, dense_flops, batch_size, seq_len, seed, trained):
        from .flops import report
        return report(model, dense_flops, batch_size, seq_len, seed, trained)

    def reset_stats(self) -> None:
        # per routed unit: processed tokens, valid tokens, correct causal decisions, decisions scored
        device = self.stats.device if hasattr(self, "stats") else None
        self.stats = torch.zeros(len(self.units), 4, dtype=torch.long, device=device)

    def summary(self) -> dict:
        s = self.stats.cpu()  # the one read of the device-side counts
        out = {}
        for i in range(len(self.units)):
            t = self.unit_name(i)
            if s[i, 1] > 0:
                out[f"realized_capacity/{t}"] = round(float(s[i, 0] / s[i, 1]), 4)
            if s[i, 3] > 0:
                out[f"predictor_accuracy/{t}"] = round(float(s[i, 2] / s[i, 3]), 4)
        if s[:, 1].sum() > 0:
            out["realized_capacity"] = round(float(s[:, 0].sum() / s[:, 1].sum()), 4)
        if s[:, 3].sum() > 0:
            out["predictor_accuracy"] = round(float(s[:, 2].sum() / s[:, 3].sum()), 4)
        return out

    # -- the routed forward of unit self.units[i] (a block or one of its sub-layers) -------------------------
    def scores(self, i: int, x: torch.Tensor):
        """Router logits r [B, S] and the causal decision logits [B, S] (predictor, or the router itself)."""
        r = self.router(i, x)
        return r, (self.predictor(i, x) if self.config.causal == "predictor" else r)

    def router(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.routers[i](router_input(self.config, x)).squeeze(-1)

    def predictor(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.predictors[i](x.float().detach()).squeeze(-1)

    def route(self, module, i: int, forward, args, kwargs):
        x, named = self._split(module, args, kwargs)
        valid = self.valid_mask(x)
        kind = self.units[i][1]
        # an eval-mode base model routes causally even if the method module was left in train mode
        causal = self.active_routing(self.training and module.training) == "causal"
        if self.config.update == "gated" and not causal and self._routing == "auto":
            out = self._gated(i, forward, x, named, valid)
            return (out, None) if kind == "attention" else out
        cache = named.get(CACHE_ARG)
        if cache is not None and self.training and torch.is_grad_enabled():
            named[CACHE_ARG] = cache = None  # training never decodes: keep no subset K/V
        step = x.shape[1] == 1 and (cache is not None or (causal and self._continues(x)))
        if step and causal and self.config.causal == "predictor":
            # a decoding step needs the router's logits only for the rows that process their token (_step)
            r, decide = None, self.predictor(i, x)
        else:
            r, decide = self.scores(i, x)
        slots, sel, topk = self._select(i, r, decide, valid, cache, causal, x)
        self._record(i, sel, valid, decide, topk)
        if self.training and torch.is_grad_enabled() and self.config.aux_weight > 0 and topk is not None \
                and self.config.causal != "threshold":
            self._causal_loss(decide, topk, valid)
        call = Call(module, i, kind, forward, x, named, valid, sel, r, cache, slots)
        out = self._step(call) if step else self._subset(call)
        return (out, None) if kind == "attention" else out

    def _causal_loss(self, decide, topk, valid) -> None:
        """The auxiliary BCE of the causal decisions (predictor, or the router itself) against top-k membership."""
        w = valid.to(decide.dtype)
        bce = F.binary_cross_entropy_with_logits(decide, topk.to(decide.dtype), reduction="none")
        self.add_aux(self.config.aux_weight * (bce * w).sum() / w.sum().clamp(min=1))

    def _split(self, module, args, kwargs):
        """The routed module's hidden-state input and its other arguments, by name."""
        if len(args) == 1:  # block(hidden_states, **kwargs), as Llama calls it: no need for the (slow) signature bind
            return args[0], dict(kwargs)
        if not args and "hidden_states" in kwargs:  # Llama's self_attn(hidden_states=...)
            named = dict(kwargs)
            return named.pop("hidden_states"), named
        named = self.arch.bind(module, args, kwargs)
        return named.pop(next(iter(named))), named

    def _rest(self, x, kind):
        """What a token that is not processed gets: its input (a block) or nothing (a sub-layer's branch)."""
        return x if kind == "block" else torch.zeros_like(x)

    def _gated(self, i, forward, x, named, valid):
        """update="gated" while training: the unit runs on every token and the hard gate z of each token keeps
        its update or not (exact values forward; the straight-through gradient reaches every token's router
        score from what its update adds or would have added)."""
        kind = self.units[i][1]
        r = self.router(i, x)
        z, hard = gate_values(self.config, r, self.progress, self._first(i, valid, None))
        hard = hard & valid
        self._record(i, hard, valid, r, None)
        self._executed.append((executed_fraction(z, valid), i))
        y = self._run(forward, x, named)
        f = y if kind != "block" else y - x
        return torch.where(hard.unsqueeze(-1), y, self._rest(x, kind)) + (z - z.detach()).unsqueeze(-1).to(y.dtype) * f

    def _run(self, forward, x, kw):
        y = forward(x, **kw)
        return y[0] if isinstance(y, tuple) else y  # attention returns (output, weights)

    def _subset(self, c: Call):
        """Gather the selected tokens of each row, run the module on them, scatter the results back."""
        x, kind = c.x, c.kind
        if c.cache is None and (c.slots[2] == x.shape[1] if c.slots is not None else bool((c.sel == c.valid).all())):
            # every real token is selected (top-k: K = S gives k = n in every row): run the module as it was
            return self._dense(c.forward, x, c.named, c.sel, self._weight(c.r), kind)
        if c.slots is None and x.shape[0] > 1:
            store = None if c.cache is None else self._store(c.cache, c.i)
            if store is None or not store.written:
                return self._packed(c, store)
        idx, count, top = c.slots if c.slots is not None else selected_slots(c.sel)
        if top == 0:
            if c.cache is not None:
                self._store(c.cache, c.i).start(x.shape[0], x.device)
            return self._idle(c)
        b, s, d = x.shape
        flat = flat_positions(idx, s)
        weight = self._weight(c.r)
        xs = take_slots(x, idx, flat)
        kw = self._subset_kwargs(c.module, c.i, kind, c.named, idx, flat, count, top, xs)
        rest = None if kind != "block" else xs
        weight = None if weight is None else take_slots(weight, idx, flat)
        new = self._update(rest, self._run(c.forward, xs, kw), weight)
        if c.slots is None or not self._full:  # rows may fill fewer slots than K: unfilled slots change nothing
            filled = torch.arange(top, device=x.device).unsqueeze(0) < count.unsqueeze(1)
            new = torch.where(filled.unsqueeze(-1), new, xs if rest is not None else torch.zeros_like(new))
        return self._rest(x, kind).reshape(b * s, d).index_copy(0, flat, new.reshape(-1, d)).view(b, s, d)

    def _packed(self, c: Call, store):
        """Causal routing at batch > 1 (no cache, or the first call into an empty one, `store`: a prompt): the
        processed tokens of all rows packed together (each row causal and apart from the others), so the module's
        work follows what the rows really route."""
        b, s, d = c.x.shape
        if store is not None:
            store.start(b, c.x.device)
        packed = pack(c.sel)
        if packed is None:
            return self._idle(c)
        idx, seg, flat, slot = packed[:4]
        xs = take_packed(c.x, idx, b)
        kw = at_positions(c.named, lambda t: take_packed(t, idx, b))
        if self._keeps_kv(c.kind):
            kw["attention_mask"] = packed_mask(seg, attn_impl(c.module), c.x.dtype)
            if store is not None:
                kw[CACHE_ARG] = PackedView(store, packed, b)
        weight = self._weight(c.r)
        weight = None if weight is None else take_packed(weight, idx, b)
        new = self._update(xs if c.kind == "block" else None, self._run(c.forward, xs, kw), weight)
        out = self._rest(c.x, c.kind).reshape(b * s, d).index_copy(0, flat, new.reshape(-1, d).index_select(0, slot))
        return out.view(b, s, d)

    def _step(self, c: Call):
        """A decoding step (one new token per row): the module runs only on the rows that process their token
        (those rows' KV stores gathered and scattered back); the other rows keep their store and skip it."""
        x, kind, b = c.x, c.kind, c.x.shape[0]
        if self._keeps_kv(kind):
            store = self._store(c.cache, c.i)
            start = store.start(b, x.device)
        # the step's one host read: which rows process their token (the store lengths are known on the host)
        picked = [j for j, on in enumerate(c.sel[:, 0].tolist()) if on]
        n = len(picked)
        if n == 0:
            return self._idle(c)
        pick = rows = None if n == b else torch.tensor(picked).to(x.device, non_blocking=True)
        kw = take_rows_all(c.named, pick, b)
        kw.pop("cache_position", None)
        xr = x if pick is None else x.index_select(0, rows)
        if self._keeps_kv(kind):
            begin = start if pick is None else start.index_select(0, rows)
            host = [store.lengths()[j] for j in picked]
            kw[CACHE_ARG] = store.view(torch.ones_like(begin), 1, pick, added=[1] * n, picked=picked)
            kw["attention_mask"] = subset_mask(begin, 1, max(host) + 1, attn_impl(c.module), x.dtype, x.device, host)
        r = c.r
        if r is None:
            r = self.router(c.i, xr)
        elif pick is not None:
            r = r.index_select(0, rows)
        weight = self._weight(r)
        y = self._update(xr if kind == "block" else None, self._run(c.forward, xr, kw), weight)
        return y if pick is None else self._rest(x, kind).index_copy(0, rows, y)

    def _idle(self, c: Call):
        """No token here is processed. Where the module's weights are sharded, every rank must call it all the same
        (gathering them is a collective): on one token, without the KV cache, its output thrown away."""
        rest = self._rest(c.x, c.kind)
        if not must_call([c.module]):
            return rest
        one = torch.zeros(1, dtype=torch.long, device=c.x.device)
        kw = take_rows_all(c.named, one, c.x.shape[0])
        kw.pop(CACHE_ARG, None)
        xs = c.x[:1, :1]
        kw = self._subset_kwargs(c.module, None, c.kind, kw, one.view(1, 1), one, torch.ones_like(one), 1, xs)
        return attach_spares(rest, [self._run(c.forward, xs, kw)])

    @staticmethod
    def _keeps_kv(kind: str) -> bool:
        """Whether the routed module attends (keeps K/V of the tokens it processed): not a routed MLP, which is
        token-wise and is never handed the KV cache."""
        return kind != "mlp"

    def _continues(self, x) -> bool:
        """Whether this call continues earlier tokens (a decoding step): the attention mask, which also covers a
        KV cache's tokens, is longer than x. How a routed MLP, never handed the cache, knows."""
        mask = self.inputs.get("attention_mask")
        return torch.is_tensor(mask) and mask.dim() == 2 and mask.shape[1] > x.shape[1]

    def _select(self, i, r, decide, valid, cache, causal: bool, x):
        """The slots (idx, count, K) of the tokens block i processes, as a [B, S] selection, and their top-k
        membership: the selection in top-k mode (static shapes, no host sync: what training runs), the target of
        the causal decision otherwise (there only for statistics, and None in decoding steps, where a sequence's
        top-k is undefined)."""
        if cache is None:
            fresh = self._keeps_kv(self.units[i][1]) or not self._continues(valid)
        else:
            fresh = i not in cache.__dict__.get(KEY, {})  # before _first creates the store
        first = self._first(i, valid, cache)
        if not causal:
            idx, count, top = topk_slots(r.detach(), valid, self.config.capacity, first, self._full)
            topk = membership(idx, count, top, valid, self._full)
            return (idx, count, top), topk, topk
        if fresh and r is None:
            r = self.router(i, x)
        # the top-k target scores a predictor's (or aux_loss router's) decisions; a threshold decision has none
        scored = fresh and self.config.causal != "threshold"
        topk = topk_membership(r.detach(), valid, self.config.capacity, first) if scored else None
        sel = (decide.detach() > 0) & valid
        sel = sel if first is None else sel | first
        return None, sel, topk

    def _first(self, i, valid, cache):
        """[B, S] the first real token of each row where config.keeps_first (else None). With a KV cache the
        row's first real token may have come in an earlier call: it is here only while the row's store is empty
        (the first real token always enters it)."""
        if not self.config.keeps_first:
            return None
        first = valid if valid.shape[1] == 1 else first_real(valid)
        mask = self.inputs.get("attention_mask")
        if cache is None and self._continues(valid):  # a routed MLP while decoding: the row's whole mask says
            first = first_real(mask.to(device=valid.device, dtype=torch.bool))[:, -valid.shape[1]:]
        if cache is not None:
            empty = self._store(cache, i).start(valid.shape[0], valid.device) == 0
            first = first & empty.unsqueeze(1)
        return first

    def _store(self, cache, i):
        if self.units[i][0] == 0 and self._keeps_kv(self.units[i][1]):
            raise ConfigError(f"MoDConfig.layers: block 0 cannot be routed (skip={self.config.skip!r}) when "
                              "decoding with a KV cache (the model reads its cache length from block 0)")
        return store_for(cache, i)

    def _weight(self, r):
        """[B, S, 1] weight of f: the raw router logit (paper) or g - 1 = s - stopgrad(s) (retrofit: zero in
        the forward pass, the gradient of s = sigmoid(r) in the backward pass; None where nothing needs it: also
        for "gated", whose router learns in _gated)."""
        if self.config.update == "paper":
            return r.unsqueeze(-1)
        if not r.requires_grad or self.config.update == "gated":
            return None
        s = torch.sigmoid(r)
        return (s - s.detach()).unsqueeze(-1)

    def _update(self, x, y, weight):
        """The routed output, given _weight's [.., 1] weight: of a block (input x, output y, so f = y - x), or of a
        sub-layer's residual branch (x None, f = y)."""
        if weight is None:
            return y
        w = weight.to(y.dtype)
        f = y if x is None else y - x
        if self.config.update == "retrofit":
            return torch.addcmul(y, w, f)
        return w * f if x is None else torch.addcmul(x, w, f)

    def _dense(self, forward, x, named, sel, weight, kind):
        """Every real token is selected (capacity 1.0): the module runs as it was, bit for bit."""
        y = self._run(forward, x, named)
        return torch.where(sel.unsqueeze(-1), self._update(x if kind == "block" else None, y, weight),
                           self._rest(x, kind))

    def _subset_kwargs(self, module, i, kind, named, idx, flat, count, top, xs):
        """The module's arguments for the gathered tokens at slots idx [B, K] (flat: flat_positions(idx, S)): their
        positions, and for attention the subset's causal mask and KV store (count [B] of the slots are filled)."""
        kw = at_positions(named, lambda t: take_slots(t, idx, flat))
        cache = kw.get(CACHE_ARG)
        if not self._keeps_kv(kind):  # an MLP: token-wise, no mask, no K/V
            return kw
        impl = attn_impl(module)
        if cache is not None:
            store = self._store(cache, i)
            start = store.start(idx.shape[0], idx.device)
            host = list(store.lengths())
            kw[CACHE_ARG] = store.view(count, top)
            kw["attention_mask"] = subset_mask(start, top, max(host) + top, impl, xs.dtype, xs.device, host)
        else:
            kw["attention_mask"] = subset_mask(None, top, top, impl, xs.dtype, xs.device)
        return kw

    def _record(self, i, sel, valid, decide, topk):
        """Statistics stay on the device (no host sync per step); summary() reads them when asked."""
        with torch.no_grad():
            if self.stats.device != sel.device:
                self.stats = self.stats.to(sel.device)
            if topk is None:  # a decoding step: no decision to score (the fewest ops: it runs once per token)
                self.stats[i].narrow(0, 0, 2).add_(torch.stack([sel, valid]).flatten(1).sum(1))
                return
            right = ((decide > 0) == topk) & valid
            self.stats[i].add_(torch.stack([sel, valid, right, valid]).flatten(1).sum(1))


def at_positions(named: dict, take) -> dict:
    """A routed module's arguments for a subset of the tokens: position embeddings and ids taken at the subset's
    positions (take: t [B or 1, S, ...] -> the subset's), cache_position dropped (the subset's are not a range)."""
    kw = dict(named)
    kw.pop("cache_position", None)
    pe = kw.get("position_embeddings")
    if pe is not None:
        kw["position_embeddings"] = tuple(take(t) for t in pe)
    pos = kw.get("position_ids")
    if isinstance(pos, torch.Tensor) and pos.dim() == 2:
        kw["position_ids"] = take(pos)
    return kw
