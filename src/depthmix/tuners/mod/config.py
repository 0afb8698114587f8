from __future__ import annotations

from dataclasses import dataclass

from ...config import MethodConfig, check_layers


@dataclass
class MoDConfig(MethodConfig):
    """Mixture-of-Depths token routing (Raposo et al. 2024): each routed block processes only the top-k tokens of
    each sequence (k = ceil(capacity * length), at least 1); the others go around it through the residual.

    capacity: fraction of each sequence's tokens that a routed block processes, in (0, 1].
    layers: "every_other" (blocks 1, 3, 5, ...), "all", or a list of block indices.
    causal: how routing is decided where the future is unknown (generation, routing="causal"):
        "predictor" (a small MLP on stopgrad(x), trained with BCE against top-k membership) or
        "aux_loss" (BCE on the router logits themselves).
    update: "paper" (x + r * f(x), r the raw router logit; for training from scratch) or "retrofit"
        (x + g * f(x) with g = 1 + s - stopgrad(s), s = sigmoid(r): exactly the block's output in the forward
        pass, so capacity 1.0 is the dense model; for router tuning of pretrained models).
    aux_weight: weight of the BCE loss (predictor or router) added to the model's loss.
    """

    method = "mod"
    capacity: float = 0.125
    layers: str | list[int] = "every_other"
    causal: str = "predictor"
    update: str = "paper"
    aux_weight: float = 0.01

    def validate(self) -> None:
        self._check(isinstance(self.capacity, (int, float)) and not isinstance(self.capacity, bool)
                    and 0 < self.capacity <= 1, "capacity", "a number in (0, 1]")
        check_layers(self, "layers", ("every_other", "all"))
        self._check(self.causal in ("predictor", "aux_loss"), "causal", "'predictor' or 'aux_loss'")
        self._check(self.update in ("paper", "retrofit"), "update", "'paper' or 'retrofit'")
        self._check(isinstance(self.aux_weight, (int, float)) and not isinstance(self.aux_weight, bool)
                    and self.aux_weight >= 0, "aux_weight", "a number >= 0")
