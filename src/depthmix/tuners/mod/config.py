from __future__ import annotations

from dataclasses import dataclass, field

from ...config import MAX_WEIGHT, ConfigError, MethodConfig, check_layers, check_range

SKIP = ("block", "attention", "mlp", "sublayers")
UPDATES = ("paper", "retrofit", "gated")
GATES = ("sigmoid", "gumbel")
BUDGETS = ("unit", "global")
RETROFIT_LOSSES = ("distill", "lm", "both")


@dataclass
class MoDConfig(MethodConfig):
    """Mixture-of-Depths token routing (Raposo et al. 2024): each routed block processes only the top-k tokens of
    each sequence (k = ceil(capacity * length), at least 1); the others go around it through the residual.

    Routing of a built model (not a config field): top-k while training, causal whenever the model is not
    training (eval forward, scoring, generate); see MoD.routing for the explicit top-k opt-in of studies.
    Remaining ties between equal router scores go to the earlier position.
    """

    method = "mod"
    flop_fields = ("capacity", "layers", "causal", "skip")  # what `depthmix flops` counts depends on
    capacity: float = field(default=0.125, metadata={"help":
        "fraction of each sequence's tokens that a routed block processes, in (0, 1]."})
    layers: str | list[int] = field(default="every_other", metadata={"help":
        "'every_other' (blocks 1, 3, 5, ...), 'all', or a list of block indices."})
    skip: str = field(default="block", metadata={"help":
        "what a token that is not routed skips in a routed block: 'block' (the whole block, the paper), "
        "'attention' (only the attention sub-layer: the token still goes through the MLP), 'mlp' (only the MLP "
        "sub-layer) or 'sublayers' (both, each routed on its own with its own router: a token may skip the "
        "attention and keep the MLP, or the reverse). For a sub-layer the router reads the sub-layer's own (normed) "
        "input, and the routed update applies to its residual branch f: f on processed tokens (retrofit; r * f for "
        "'paper'), 0 on the others. Llama-like models (self_attn, mlp) and GPT-2 (attn, mlp)."})
    causal: str | None = field(default=None, metadata={"help":
        "how routing is decided where the future is unknown (generation, routing='causal'): 'predictor' (a small "
        "MLP on stopgrad(x), trained with BCE against top-k membership), 'aux_loss' (BCE on the router logits "
        "themselves) or 'threshold' (the router's own decision r > 0, trained by the gate; update='gated' only). "
        "Default (null): 'threshold' for update='gated', else 'predictor'."})
    update: str = field(default="paper", metadata={"help":
        "'paper' (x + r * f(x), r the raw router logit; for training from scratch), 'retrofit' (x + g * f(x) with "
        "g = 1 + s - stopgrad(s), s = sigmoid(r): exactly the block's output in the forward pass, so capacity 1.0 "
        "is the dense model; router tuning of pretrained models, top-k) or 'gated' (router tuning that sees every "
        "token: while training every routed unit runs on every token and a hard per-token gate z in {0, 1} keeps "
        "its update or not, x + z * f(x), with a straight-through gradient, so skipped tokens teach the router too; "
        "outside training the gate is the causal decision r > 0 and a skipped token skips the compute; capacity is "
        "the target of the executed fraction, met on average)."})
    hard_gate: str = field(default="sigmoid", metadata={"help":
        "update='gated', how the hard per-token gate is drawn and differentiated: 'sigmoid' (z = [r > 0], "
        "gradient of sigmoid(r / T); MindSkip) or 'gumbel' (z = [r + L > 0] with logistic noise L while training, "
        "gradient of sigmoid((r + L) / T); SkipGPT's hard Gumbel)."})
    gate_temperature: float = field(default=5.0, metadata={"help":
        "update='gated': the gate's temperature T when training starts, annealed linearly to gate_temperature_end "
        "over the run (SkipGPT: 5 to 1)."})
    gate_temperature_end: float = field(default=1.0, metadata={"help":
        "update='gated': the gate's temperature T when training ends."})
    budget: str = field(default="unit", metadata={"help":
        "update='gated': 'unit' (each routed unit's executed fraction pulled toward capacity) or 'global' (one "
        "executed fraction over all routed units, each weighted by its parameter count, pulled toward capacity: "
        "training spends the skips where they cost least)."})
    budget_weight: float = field(default=20.0, metadata={"help":
        "update='gated': weight w of the budget loss w * |executed fraction - capacity| (SkipGPT: 20)."})
    aux_weight: float = field(default=0.01, metadata={"help":
        "weight of the BCE loss (predictor or router) added to the model's loss."})
    keep_first: bool | None = field(default=None, metadata={"help":
        "the first real (non-padding) token of each sequence is processed by every routed block, in top-k (it takes "
        "one of the k slots), causal routing and decoding. None (default): on for update='retrofit' and 'gated', "
        "off for 'paper'. A pretrained model uses its first token as an attention sink that every later token attends to; "
        "with zero-initialised routers every score ties, and a retrofit that lets it skip blocks loses the sink "
        "(SmolLM2's held-out NLL doubles). A model trained from scratch with MoD learns its own routing, so the "
        "paper's rule stays unchanged there."})
    retrofit_loss: str | None = field(default=None, metadata={"help":
        "what router tuning (update 'retrofit' or 'gated') trains on: 'distill' (the KL from the same model with "
        "routing bypassed and LoRA off), 'lm', or 'both' (their sum); each plus the method's auxiliary losses. "
        "null (default): the trainer's loss."})

    def __post_init__(self):
        if self.causal is None:  # the default of the update rule, written out (saved configs name it)
            self.causal = "threshold" if self.update == "gated" else "predictor"
        super().__post_init__()

    def validate(self) -> None:
        self._check(0 < self.capacity <= 1, "capacity", "a number in (0, 1]")
        check_layers(self, "layers", ("every_other", "all"))
        self._check(self.skip in SKIP, "skip", "'block', 'attention', 'mlp' or 'sublayers'")
        self._check(self.update in UPDATES, "update", "'paper', 'retrofit' or 'gated'")
        if self.update == "gated":
            self._check(self.causal == "threshold", "causal",
                        "'threshold' or null with update='gated' (the router's own decision is the gate)")
        else:
            self._check(self.causal in ("predictor", "aux_loss"), "causal",
                        "'predictor', 'aux_loss' or null ('threshold' needs update='gated')")
        self._check(self.hard_gate in GATES, "hard_gate", "'sigmoid' or 'gumbel'")
        check_range(self, "gate_temperature", 1e-3, 1e3)
        check_range(self, "gate_temperature_end", 1e-3, 1e3)
        self._check(self.budget in BUDGETS, "budget", "'unit' or 'global'")
        check_range(self, "budget_weight", 0, MAX_WEIGHT)
        check_range(self, "aux_weight", 0, MAX_WEIGHT)
        self._check(self.retrofit_loss in (None, *RETROFIT_LOSSES), "retrofit_loss",
                    f"null or one of {RETROFIT_LOSSES}")
        if self.retrofit_loss is not None and self.update not in ("retrofit", "gated"):
            raise ConfigError(f"MoDConfig.retrofit_loss = {self.retrofit_loss!r}: retrofit_loss is for router tuning, "
                              f"with update 'retrofit' or 'gated' (update is {self.update!r})")

    def check_decoding(self) -> None:
        first = self.layers == "all" or (isinstance(self.layers, (list, tuple)) and 0 in self.layers)
        if first and self.skip != "mlp":
            raise ConfigError(f"MoDConfig.layers = {self.layers!r}: block 0 cannot be routed (skip={self.skip!r}) "
                              "when decoding with a KV cache (the model reads its cache length from block 0); route "
                              "blocks from 1 on (every_other, or a list without 0)")

    @property
    def keeps_first(self) -> bool:
        """Whether the first real token of each sequence always goes through every routed block."""
        return self.update != "paper" if self.keep_first is None else self.keep_first
