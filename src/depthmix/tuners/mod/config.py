from __future__ import annotations

from dataclasses import dataclass, field

from ...config import MAX_WEIGHT, MethodConfig, check_layers, check_range

SKIP = ("block", "attention", "mlp")


@dataclass
class MoDConfig(MethodConfig):
    """Mixture-of-Depths token routing (Raposo et al. 2024): each routed block processes only the top-k tokens of
    each sequence (k = ceil(capacity * length), at least 1); the others go around it through the residual.

    Routing of a built model (not a config field): top-k while training, causal whenever the model is not
    training (eval forward, scoring, generate); see MoD.routing for the explicit top-k opt-in of studies.
    Remaining ties between equal router scores go to the earlier position.
    """

    method = "mod"
    capacity: float = field(default=0.125, metadata={"help":
        "fraction of each sequence's tokens that a routed block processes, in (0, 1]."})
    layers: str | list[int] = field(default="every_other", metadata={"help":
        "'every_other' (blocks 1, 3, 5, ...), 'all', or a list of block indices."})
    skip: str = field(default="block", metadata={"help":
        "what a token that is not routed skips in a routed block: 'block' (the whole block, the paper), "
        "'attention' (only the attention sub-layer: the token still goes through the MLP) or 'mlp' (only the MLP "
        "sub-layer). For a sub-layer the router reads the sub-layer's own (normed) input, and the routed update "
        "applies to its residual branch f: f on processed tokens (retrofit; r * f for 'paper'), 0 on the others. "
        "Llama-like models (self_attn, mlp) and GPT-2 (attn, mlp)."})
    causal: str = field(default="predictor", metadata={"help":
        "how routing is decided where the future is unknown (generation, routing='causal'): 'predictor' (a small "
        "MLP on stopgrad(x), trained with BCE against top-k membership) or 'aux_loss' (BCE on the router logits "
        "themselves)."})
    update: str = field(default="paper", metadata={"help":
        "'paper' (x + r * f(x), r the raw router logit; for training from scratch) or 'retrofit' (x + g * f(x) "
        "with g = 1 + s - stopgrad(s), s = sigmoid(r): exactly the block's output in the forward pass, so capacity "
        "1.0 is the dense model; for router tuning of pretrained models)."})
    aux_weight: float = field(default=0.01, metadata={"help":
        "weight of the BCE loss (predictor or router) added to the model's loss."})
    keep_first: bool | None = field(default=None, metadata={"help":
        "the first real (non-padding) token of each sequence is processed by every routed block, in top-k (it takes "
        "one of the k slots), causal routing and decoding. None (default): on for update='retrofit', off for "
        "'paper'. A pretrained model uses its first token as an attention sink that every later token attends to; "
        "with zero-initialised routers every score ties, and a retrofit that lets it skip blocks loses the sink "
        "(SmolLM2's held-out NLL doubles). A model trained from scratch with MoD learns its own routing, so the "
        "paper's rule stays unchanged there."})

    def validate(self) -> None:
        self._check(0 < self.capacity <= 1, "capacity", "a number in (0, 1]")
        check_layers(self, "layers", ("every_other", "all"))
        self._check(self.skip in SKIP, "skip", "'block', 'attention' or 'mlp'")
        self._check(self.causal in ("predictor", "aux_loss"), "causal", "'predictor' or 'aux_loss'")
        self._check(self.update in ("paper", "retrofit"), "update", "'paper' or 'retrofit'")
        check_range(self, "aux_weight", 0, MAX_WEIGHT)

    @property
    def keeps_first(self) -> bool:
        """Whether the first real token of each sequence always goes through every routed block."""
        return self.update == "retrofit" if self.keep_first is None else self.keep_first
