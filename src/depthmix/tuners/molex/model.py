"""MoLEx wired into a model: gates and alpha, expert calls grouped by expert, KV-cache slots for experts."""
from __future__ import annotations

import contextlib
import functools
import math

import torch
from torch import nn
from ...blocks import CACHE_ARG, take_rows_all, unrecorded
from ...config import ConfigError, pick_layers
from ...sharding import attach_spares, must_call
from ..base import Method, float32_linear
from .cache import experts_for
from .dist import agree
from .layer import CosineGate, MoLExBlock, balance_loss, route


class MoLEx(Method):
    draws_routing = True
    routing_title = "MoLEx layer choice"

    def __init__(self, config, arch, hidden_size: int):
        super().__init__(config, arch)
        num = arch.num_layers
        self.layers = pick_layers(config.layers, num, "MoLExConfig.layers")
        self.pairs = self._pairs(config.pairs, num) if config.gate == "pair" else None
        gate = functools.partial(CosineGate, dim=config.gate_dim, temperature=config.gate_temperature,
                                 norm=config.gate_norm) if config.gate == "cosine" else float32_linear
        count = 0 if config.gate == "pair" else 1 if config.shared_gate else len(self.layers)
        self.gates = nn.ModuleList(gate(hidden_size, num) for _ in range(count))
        if config.gate_grad == "frozen":  # the control: random gates, kept as they start (and saved with the adapter)
            self.gates.requires_grad_(False)
        if config.learn_alpha:
            init = math.log(config.alpha / (1 - config.alpha))
            self.alpha_logit = nn.Parameter(torch.full((len(self.layers),), init, dtype=torch.float32))
        # Token routing in a causal LM: a later token may pick an expert whose keys/values for the earlier
        # tokens were never computed, so decoding recomputes the sequence instead of caching.
        self.supports_cache = not (arch.causal and config.granularity == "token")
        self._generating, self._generate_prompt = False, None  # see generating()
        self.counts = torch.zeros(len(self.layers), num, dtype=torch.long)
        for i, t in enumerate(self.layers):
            self.wrap(arch.blocks[t], MoLExBlock, i)

    def _pairs(self, pairs, num: int) -> list[int]:
        if pairs == "next":
            return [t + 1 if t + 1 < num else t - 1 for t in self.layers]
        if len(pairs) != len(self.layers) or max(pairs) >= num:
            raise ConfigError(f"MoLExConfig.pairs = {pairs!r}: expected one layer index below {num} for each of the "
                              f"{len(self.layers)} mixed layers {self.layers}")
        return [int(j) for j in pairs]

    def alpha(self, i: int) -> torch.Tensor:
        if self.config.learn_alpha:
            return torch.sigmoid(self.alpha_logit[i])
        return torch.tensor(float(self.config.alpha))

    def gate(self, i: int) -> nn.Linear:
        return self.gates[0 if self.config.shared_gate else i]

    def units(self, z: torch.Tensor) -> torch.Tensor:
        """The tokens whose gate logits decide: the valid ones; in a causal LM's sequence routing, the prompt only
        (so that no position's output depends on a later token): an explicit prompt_mask, else the prompt of the
        generate() call, else the tokens before the first label, else the first token (the causal fallback)."""
        valid = self.valid_mask(z)
        if self.config.granularity == "token" or not self.arch.causal:
            return valid
        first = valid & (valid.cumsum(1) == 1)
        marked = self.prompt_marks(z)
        if marked is None:
            return first
        # Only the leading run of marked real tokens: a mark after the prompt ended would let a later token vote.
        prompt = valid & marked & ((valid & ~marked).cumsum(1) == 0)
        return torch.where(prompt.any(1, keepdim=True), prompt, first)

    def prompt_marks(self, z: torch.Tensor) -> torch.Tensor | None:
        """[B, S] bool marking the prompt of this call's tokens, or None where nothing says where it ends."""
        b, s = z.shape[:2]
        explicit = self.inputs.get("prompt_mask")
        if explicit is not None:
            return explicit[:, -s:].to(device=z.device, dtype=torch.bool)
        if self._generate_prompt is not None:  # z covers columns total - s .. total of the generated sequence
            mask = self.inputs.get("attention_mask")
            total = mask.shape[1] if torch.is_tensor(mask) and mask.dim() == 2 else s
            return (torch.arange(total - s, total, device=z.device) < self._generate_prompt).expand(b, s)
        labels = self.inputs.get("labels")
        if labels is not None and labels.shape == (b, s):
            return labels.to(z.device) == -100
        shifted = self.inputs.get("shift_labels")  # shifted[:, j] is scored at j: the prompt runs through j
        if shifted is not None and shifted.shape == (b, s):
            scored = shifted.to(z.device) != -100
            return (scored.cumsum(1) - scored.long()) == 0
        return None

    # -- generate(): the prompt is the input of the first forward, remembered until generate() returns ---------
    @contextlib.contextmanager
    def generating(self, decoding):
        if not self.supports_cache:
            decoding.refuse("MoLEx", "token routing decodes without a KV cache, and this decoding needs one; "
                                     "granularity 'sequence' supports it")
        self._generating, self._generate_prompt = True, None
        try:
            yield
        finally:
            self._generating, self._generate_prompt = False, None

    def begin(self, inputs: dict) -> None:
        super().begin(inputs)
        if self._generating and self._generate_prompt is None:
            first = inputs.get("input_ids")
            first = inputs.get("inputs_embeds") if first is None else first
            self._generate_prompt = None if first is None else first.shape[1]

    # -- the mixed forward of block self.layers[i] ------------------------------------------------------------
    def mix(self, block, i: int, forward, args, kwargs):
        named = self.arch.bind(block, args, kwargs)
        z = named.pop(next(iter(named)))
        t = self.layers[i]
        cache = named.get(CACHE_ARG)
        if cache is not None and not self.supports_cache and cache.get_seq_length(t) > 0:
            raise RuntimeError("MoLEx token routing in a causal LM cannot decode from a KV cache; "
                               "use use_cache=False (DepthMixModel.generate does this for you)")
        state = None if cache is None else experts_for(cache, i)
        out = forward(z, **named)

        if state is not None and state.choice is not None:  # decoding: the prompt's decision holds
            choice, factor = state.choice, None
        else:
            units = self.units(z)
            choice, factor = self._choose(i, z, units)
            if state is not None:
                state.choice = choice
            if self.recording:
                picked = choice[units] if self.config.granularity == "token" else choice[units.any(1)]
                self.counts[i] += torch.bincount(picked.cpu(), minlength=self.counts.shape[1])

        if self.config.granularity != "token":
            expert = self._by_sequence(t, z, out, named, choice, state)
        else:
            expert = self._by_token(t, z, out, named, choice)
        a = self.alpha(i).to(device=out.device, dtype=torch.float32)
        weight = 1 - a if factor is None else (1 - a) * factor.reshape(*factor.shape, *[1] * (out.dim() - factor.dim()))
        return torch.addcmul(out * a.to(out.dtype), expert, weight.to(out.dtype))

    def _choose(self, i: int, z: torch.Tensor, units: torch.Tensor):
        """(choice, straight-through factor or None) of mixed layer i; adds the balance loss while training."""
        granularity = self.config.granularity
        if self.pairs is not None:
            shape = units.shape if granularity == "token" else units.shape[:1]
            return torch.full(shape, self.pairs[i], dtype=torch.long, device=z.device), None
        if granularity == "batch":  # every position votes; in generate() the prompt's, whether cached or not
            marks = self.prompt_marks(z) if self._generate_prompt is not None else None
            units = torch.ones_like(units) if marks is None else marks.to(units.device)
        choice, factor, probs = route(self.gate(i)(z.float()), units, granularity)
        if self.config.gate_grad != "straight_through":  # the gate learns from the balance loss alone, or not
            factor = None
        if self.training and self.config.balance_weight > 0:
            if granularity == "batch":  # as the public code: T * P_j of the voted j, P over every position
                loss = balance_loss(probs, choice, None)
            else:
                loss = balance_loss(probs, choice, units if granularity == "token" else None)
            self.add_aux(self.config.balance_weight * loss)
        return choice, factor

    def _by_sequence(self, t, z, out, named, choice, state):
        groups = self._groups(choice.unique().tolist(), z)
        if len(groups) == 1:
            return out if groups[0] == t else self._expert(groups[0], z, named, None, state, t)
        expert = torch.empty_like(out)
        spare = []
        for j in groups:
            r = (choice == j).nonzero(as_tuple=True)[0]
            if j != t and len(r) == 0:
                spare.append(self._spare(j, z, named))
                continue
            expert.index_copy_(0, r, out.index_select(0, r) if j == t else self._expert(j, z, named, r, state, t))
        return attach_spares(expert, spare)

    def _by_token(self, t, z, out, named, choice):
        valid = self.valid_mask(z)
        expert = torch.zeros_like(out)
        spare = []
        for j in self._groups(choice[valid].unique().tolist(), z):
            sel = choice == j
            r = sel.any(1).nonzero(as_tuple=True)[0]
            if j == t:
                full = out
            elif len(r) == 0:
                spare.append(self._spare(j, z, named))
                continue
            else:
                part = self._expert(j, z, named, r if len(r) < len(choice) else None, None)
                full = part if len(r) == len(choice) else torch.zeros_like(out).index_copy(0, r, part)
            expert = torch.where(sel.unsqueeze(-1), full, expert)
        return attach_spares(expert, spare)

    def _groups(self, local, z):
        """The experts to call, in order. Sharded blocks (FSDP, ZeRO-3): the union over the ranks, so that every rank
        calls the same blocks in the same order (each call gathers the block's weights with collectives)."""
        return agree(local, self.arch.num_layers, z.device) if must_call(self.arch.blocks) else local

    def _spare(self, j, z, named):
        """Expert j on row 0 alone, for a rank none of whose rows chose it; the caller throws the output away."""
        kw = dict(named)
        if kw.get(CACHE_ARG) is not None:  # decoding: no cache to write into, so no mask over one either
            kw.pop(CACHE_ARG)
            kw.pop("attention_mask", None)
        return self._expert(j, z, kw, torch.zeros(1, dtype=torch.long, device=z.device), None)

    def _expert(self, j, z, named, rows, state, t=None):
        """Block j on z (rows of it) at layer t, called through the module so FSDP/ZeRO-3 hooks gather its weights."""
        kw = take_rows_all(named, rows, z.shape[0])
        cache = kw.get(CACHE_ARG)
        if cache is not None:
            # Expert j at layer t attends over z_t, not z_j: it needs its own cache, holding only these rows.
            every = torch.arange(z.shape[0], device=z.device)
            kw[CACHE_ARG] = None if state is None else state.view(j, every if rows is None else rows, cache, t)
        zr = z if rows is None else z.index_select(0, rows)
        with unrecorded():
            return self.arch.blocks[j](zr, depthmix_plain=True, **kw)

    def reset_stats(self) -> None:
        self.counts.zero_()

    def routing_record(self) -> dict:
        return {"picture": "layer_choice", "counts": self.counts.tolist()}

    def summary(self) -> dict:
        return {f"alpha/{t}": self.alpha(i).item() for i, t in enumerate(self.layers)}
