from __future__ import annotations

from dataclasses import dataclass

from ...config import MethodConfig, check_layers


@dataclass
class MoLExConfig(MethodConfig):
    """Mixture of Layer Experts (Teo & Nguyen, ICLR 2025): z' = a * u_t(z) + (1 - a) * u_j(z), j picked by a gate.

    alpha: initial value of a (learn_alpha=True, a = sigmoid of a per-layer scalar) or its fixed value.
    learn_alpha: train a (one scalar per mixed layer) or keep it fixed at alpha.
    routing: "sequence" (one expert per sequence, from the mean gate logits over its valid tokens; for causal
        LMs over the prompt only: prompt_mask, labels -100, generate()'s prompt, else the first token) or
        "token" (one expert per token).
    layers: "all" or a list of the layers that mix in an expert. Every layer can be picked as an expert.
    shared_gate: one gate for all mixed layers instead of one per layer.
    balance_weight: weight of the Switch-style load-balancing loss (0 = off; 0.001-0.01 is typical).
    """

    method = "molex"
    alpha: float = 0.5
    learn_alpha: bool = True
    routing: str = "sequence"
    layers: str | list[int] = "all"
    shared_gate: bool = False
    balance_weight: float = 0.0

    def validate(self) -> None:
        if self.learn_alpha:
            self._check(isinstance(self.alpha, (int, float)) and 0 < self.alpha < 1, "alpha",
                        "a number strictly between 0 and 1 when learn_alpha=True")
        else:
            self._check(isinstance(self.alpha, (int, float)) and 0 <= self.alpha <= 1, "alpha", "a number in [0, 1]")
        self._check(self.routing in ("sequence", "token"), "routing", "'sequence' or 'token'")
        check_layers(self, "layers", ("all",))
        self._check(isinstance(self.balance_weight, (int, float)) and self.balance_weight >= 0, "balance_weight",
                    "a number >= 0")
