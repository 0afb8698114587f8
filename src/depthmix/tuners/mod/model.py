"""MoD wired into a model: routers, causal predictors, one gather -> block -> scatter per routed block."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ...config import ConfigError, pick_layers
from ..base import Method, float32_linear
from .cache import KEY, store_for
from .layer import (MoDBlock, attn_impl, first_real, gather_tokens, predictor_hidden, slots, subset_mask,
                    topk_membership)

ROUTING = ("auto", "causal", "topk-lookahead")
ALIASES = {"topk": "topk-lookahead"}  # the old name: explicit top-k, in training and out of it


class MoD(Method):
    """routing:
    - "auto" (default): per-sequence top-k by router score while training (the model and its method in train
      mode), causal routing whenever not (eval forward, scoring, lm-eval, generate).
    - "causal": each token decides alone from its own hidden state (what generation does), always.
    - "topk-lookahead": top-k even outside training, for studies only: a token's routing then depends on the
      tokens after it, so teacher-forced scores see the future ("topk" is accepted as its old name).
    generate() always routes causally."""

    def __init__(self, config, arch, hidden_size: int):
        super().__init__(config, arch)
        if not arch.causal:
            raise ConfigError(f"MoDConfig: MoD routes tokens of causal LMs; {arch.family.name} is an encoder")
        self.layers = pick_layers(config.layers, arch.num_layers, "MoDConfig.layers")
        zero = config.update == "retrofit"  # Router-Tuning: zero-initialised routers on a pretrained model
        self.routers = nn.ModuleList(float32_linear(hidden_size, 1, zero=zero) for _ in self.layers)
        if config.causal == "predictor":
            h = predictor_hidden(hidden_size)
            self.predictors = nn.ModuleList(
                nn.Sequential(float32_linear(hidden_size, h), nn.SiLU(), float32_linear(h, 1)) for _ in self.layers)
        self._routing = "auto"
        self._valid = None
        self.reset_stats()
        for i, t in enumerate(self.layers):
            self.wrap(arch.blocks[t], MoDBlock, i)

    def begin(self, inputs: dict) -> None:
        super().begin(inputs)
        self._valid = None

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
        """"topk" or "causal": what a forward uses, in training or not."""
        if self._routing == "auto":
            return "topk" if training else "causal"
        return "causal" if self._routing == "causal" else "topk"

    def eval_routing(self) -> str:
        return "causal" if self.active_routing(False) == "causal" else "topk-lookahead"

    @contextlib.contextmanager
    def routing_mode(self, value: str):
        old, self.routing = self.routing, value
        try:
            yield self
        finally:
            self._routing = old

    def generating(self, kwargs: dict):
        if kwargs.get("num_beams", 1) > 1:
            raise ConfigError("MoD generate(): beam search is not supported (its KV stores are not reordered)")
        return self.routing_mode("causal")

    def reset_stats(self) -> None:
        # per routed block: processed tokens, valid tokens, correct causal decisions, decisions scored
        self.stats = torch.zeros(len(self.layers), 4, dtype=torch.float64)

    def extra_state(self) -> dict:
        s = self.stats
        out = {}
        for i, t in enumerate(self.layers):
            if s[i, 1] > 0:
                out[f"realized_capacity/{t}"] = round(float(s[i, 0] / s[i, 1]), 4)
            if s[i, 3] > 0:
                out[f"predictor_accuracy/{t}"] = round(float(s[i, 2] / s[i, 3]), 4)
        if s[:, 1].sum() > 0:
            out["realized_capacity"] = round(float(s[:, 0].sum() / s[:, 1].sum()), 4)
        if s[:, 3].sum() > 0:
            out["predictor_accuracy"] = round(float(s[:, 2].sum() / s[:, 3].sum()), 4)
        return out

    # -- the routed forward of block self.layers[i] ------------------------------------------------------------
    def scores(self, i: int, x: torch.Tensor):
        """Router logits r [B, S] and the causal decision logits [B, S] (predictor, or the router itself)."""
        xf = x.float()
        r = self.routers[i](xf).squeeze(-1)
        if self.config.causal == "predictor":
            return r, self.predictors[i](xf.detach()).squeeze(-1)
        return r, r

    def route(self, block, i: int, forward, args, kwargs):
        if len(args) == 1:  # block(hidden_states, **kwargs), as Llama calls it: no need for the (slow) signature bind
            x, named = args[0], dict(kwargs)
        else:
            named = self.arch.bind(block, args, kwargs)
            x = named.pop(next(iter(named)))
        valid = self.valid_mask(x)
        r, decide = self.scores(i, x)
        # an eval-mode base model routes causally even if the method module was left in train mode
        causal = self.active_routing(self.training and block.training) == "causal"
        cache = named.get("past_key_values")
        if cache is not None and self.training and torch.is_grad_enabled():
            named["past_key_values"] = cache = None  # training never decodes: keep no subset K/V
        sel, topk = self._select(i, r, decide, valid, cache, causal)
        self._record(i, sel, valid, decide, topk)
        if self.training and torch.is_grad_enabled() and self.config.aux_weight > 0 and topk is not None:
            w = valid.to(decide.dtype)
            bce = F.binary_cross_entropy_with_logits(decide, topk.to(decide.dtype), reduction="none")
            self.add_aux(self.config.aux_weight * (bce * w).sum() / w.sum().clamp(min=1))

        if cache is not None and x.shape[1] == 1:
            return self._step(block, i, forward, x, named, sel, r, cache)
        if cache is None and bool((sel == valid).all()):
            return self._dense(forward, x, named, sel, self._weight(r))
        idx, count, top = slots(sel)
        if top == 0:
            if cache is not None:
                store_for(cache, i).start(x.shape[0], x.device)
            return x
        weight = self._weight(r)
        xs = gather_tokens(x, idx)
        kw = self._subset_kwargs(block, i, named, idx, count, top, xs)
        ys = forward(xs, **kw)
        new = self._update(xs, ys, None if weight is None else gather_tokens(weight, idx))
        keep = torch.arange(top, device=x.device).unsqueeze(0) < count.unsqueeze(1)
        new = torch.where(keep.unsqueeze(-1), new, xs)
        return x.scatter(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]), new)

    def _step(self, block, i, forward, x, named, sel, r, cache):
        """A decoding step (one new token per sequence): nothing to gather or scatter; the block runs on every row
        if any row routes its token (rows that do not keep their store's length and their hidden state)."""
        store = self._store(cache, i)
        start = store.start(x.shape[0], x.device)
        if not bool(sel.any()):
            return x
        kw = dict(named)
        kw.pop("cache_position", None)
        kw["past_key_values"] = store.view(sel[:, 0].long(), 1)
        kw["attention_mask"] = subset_mask(start, 1, int(start.max()) + 1, attn_impl(block), x.dtype, x.device)
        y = self._update(x, forward(x, **kw), self._weight(r))
        return y if x.shape[0] == 1 else torch.where(sel.unsqueeze(-1), y, x)

    def _select(self, i, r, decide, valid, cache, causal: bool):
        """[B, S] the tokens block i processes, and their top-k membership: the selection in topk mode, the target
        of the causal decision otherwise (there only for statistics, and None in decoding steps, where a
        sequence's top-k is undefined)."""
        fresh = cache is None or i not in cache.__dict__.get(KEY, {})  # before _first creates the store
        keep = self._first(i, valid, cache)
        topk = topk_membership(r.detach(), valid, self.config.capacity, keep) if (not causal or fresh) else None
        if not causal:
            return topk, topk
        sel = (decide.detach() > 0) & valid
        return (sel if keep is None else sel | keep), topk

    def _first(self, i, valid, cache):
        """[B, S] the first real token of each row where config.keeps_first (else None). With a KV cache the
        row's first real token may have come in an earlier call: it is here only while the row's store is empty
        (the first real token always enters it)."""
        if not self.config.keeps_first:
            return None
        first = first_real(valid)
        if cache is not None:
            empty = self._store(cache, i).start(valid.shape[0], valid.device) == 0
            first = first & empty.unsqueeze(1)
        return first

    def _store(self, cache, i):
        if self.layers[i] == 0:
            raise ConfigError("MoDConfig.layers: block 0 cannot be routed when decoding with a KV cache "
                              "(the model reads its cache length from block 0)")
        return store_for(cache, i)

    def _weight(self, r):
        """[B, S, 1] weight of f(x): the raw router logit (paper) or g - 1 = s - stopgrad(s) (retrofit: zero in
        the forward pass, the gradient of s = sigmoid(r) in the backward pass; None where nothing needs it)."""
        if self.config.update == "paper":
            return r.unsqueeze(-1)
        if not r.requires_grad:
            return None
        s = torch.sigmoid(r)
        return (s - s.detach()).unsqueeze(-1)

    def _update(self, x, y, weight):
        """The routed output of block input x and block output y, given _weight's [.., 1] weight."""
        if weight is None:
            return y
        w = weight.to(y.dtype)
        return y + w * (y - x) if self.config.update == "retrofit" else x + w * (y - x)

    def _dense(self, forward, x, named, sel, weight):
        """Every real token is selected (capacity 1.0): the block runs as it was, bit for bit."""
        return torch.where(sel.unsqueeze(-1), self._update(x, forward(x, **named), weight), x)

    def _subset_kwargs(self, block, i, named, idx, count, top, xs):
        kw = dict(named)
        pe = kw.get("position_embeddings")
        if pe is not None:
            kw["position_embeddings"] = tuple(gather_tokens(t, idx) for t in pe)
        pos = kw.get("position_ids")
        if isinstance(pos, torch.Tensor) and pos.dim() == 2:
            kw["position_ids"] = gather_tokens(pos, idx)
        kw.pop("cache_position", None)
        impl = attn_impl(block)
        cache = kw.get("past_key_values")
        if cache is not None:
            store = self._store(cache, i)
            start = store.start(idx.shape[0], idx.device)
            kv = int((start + top).max())
            kw["past_key_values"] = store.view(count, top)
            kw["attention_mask"] = subset_mask(start, top, kv, impl, xs.dtype, xs.device)
        else:
            kw["attention_mask"] = subset_mask(None, top, top, impl, xs.dtype, xs.device)
        return kw

    def _record(self, i, sel, valid, decide, topk):
        with torch.no_grad():
            n = valid.sum()
            right = (((decide > 0) == topk) & valid).sum() if topk is not None else torch.zeros_like(n)
            self.stats[i] += torch.stack([sel.sum(), n, right, n if topk is not None else right]).to(self.stats)
