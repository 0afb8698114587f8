from __future__ import annotations

from dataclasses import dataclass, field

from ...config import MAX_WEIGHT, MethodConfig, check_layers, check_range


GATE_GRADS = ("straight_through", "balance", "frozen")
GATES = ("linear", "cosine", "pair")
GATE_NORMS = ("token", "sequence")
GRANULARITIES = ("sequence", "token", "batch")


@dataclass
class MoLExConfig(MethodConfig):
    """Mixture of Layer Experts (Teo & Nguyen, ICLR 2025): z' = a * u_t(z) + (1 - a) * u_j(z), j picked by a gate."""

    method = "molex"
    router_lr = 1e-2  # gates and alpha learn faster than LoRA (0.1 in the authors' GLUE scripts)
    renamed = {"routing": "granularity"}  # its old name, still read from saved adapters and config files
    alpha: float = field(default=0.5, metadata={"help":
        "initial value of a (learn_alpha=True, a = sigmoid of a per-layer scalar) or its fixed value."})
    learn_alpha: bool = field(default=True, metadata={"help":
        "train a (one scalar per mixed layer) or keep it fixed at alpha."})
    granularity: str = field(default="sequence", metadata={"help":
        "what one expert choice covers: 'sequence' (one expert per sequence, from the mean gate logits over its "
        "valid tokens; for causal LMs over the prompt only: prompt_mask, labels -100, generate()'s prompt, else the "
        "first token), 'token' (one expert per token) or 'batch' (the authors' public code, for reproduction "
        "only: one expert for the whole batch, the most frequent top-1 choice over every position, padding and later "
        "tokens included, so a sequence's prediction depends on its batch and, in a causal LM, on tokens after it; "
        "needs gate_grad 'balance' or 'frozen', as there)."})
    layers: str | list[int] = field(default="all", metadata={"help":
        "'all' or a list of the layers that mix in an expert. Every layer can be picked as an expert."})
    shared_gate: bool = field(default=False, metadata={"help":
        "one gate for all mixed layers instead of one per layer."})
    gate: str = field(default="linear", metadata={"help":
        "'linear' (logits = Linear(d, T)), 'cosine' (the public code's cosine gate: a projection to a small "
        "space, cosine similarity with one learned embedding per layer, divided by a learned temperature) or "
        "'pair' (a control without a gate: layer t always mixes in the fixed layer `pairs` gives it)."})
    gate_dim: int = field(default=16, metadata={"help":
        "with gate 'cosine': the size of the space it projects to (X-MoE's 16; the public GLUE scripts' proj_dim is "
        "128 on SST-2, 96 on QNLI, 384 on QQP, 416 on MNLI)."})
    gate_temperature: float = field(default=0.07, metadata={"help":
        "with gate 'cosine': the learned temperature's start (X-MoE's 0.07; the public code's 0.5)."})
    gate_norm: str = field(default="token", metadata={"help":
        "with gate 'cosine': what the projection is normalised over: 'token' (each token's vector: a cosine "
        "similarity) or 'sequence' (the public code, for reproduction only, with granularity 'batch': each feature "
        "over the positions of its sequence, padding included, so a token's logits depend on the rest of its "
        "sequence and on its padding)."})
    pairs: str | list[int] = field(default="next", metadata={"help":
        "with gate 'pair', the expert of each mixed layer: 'next' (layer t + 1; the last layer takes t - 1) or a "
        "list with one layer index per mixed layer, fixed before training."})
    balance_weight: float = field(default=0.0, metadata={"help":
        "weight of the Switch-style load-balancing loss (0 = off; 0.001-0.01 is typical)."})
    gate_grad: str = field(default="straight_through", metadata={"help":
        "how the gate learns: 'straight_through' (the task loss, through p_j / stopgrad(p_j) on the expert "
        "branch), 'balance' (the authors' code: the load-balancing loss alone; needs balance_weight > 0) or "
        "'frozen' (a control: the gates keep their random start and are not trained; saved with the adapter)."})

    def validate(self) -> None:
        if self.learn_alpha:
            self._check(0 < self.alpha < 1, "alpha", "a number strictly between 0 and 1 when learn_alpha=True")
        else:
            self._check(0 <= self.alpha <= 1, "alpha", "a number in [0, 1]")
        self._check(self.granularity in GRANULARITIES, "granularity", f"one of {GRANULARITIES}")
        self._check(self.granularity != "batch" or self.gate_grad != "straight_through", "granularity",
                    "gate_grad 'balance' or 'frozen' with it (the public code's batch vote gives the gate no "
                    "gradient from the task loss)")
        self._check(self.gate in GATES, "gate", f"one of {GATES}")
        self._check(isinstance(self.gate_dim, int) and not isinstance(self.gate_dim, bool) and self.gate_dim >= 1,
                    "gate_dim", "an integer >= 1")
        check_range(self, "gate_temperature", 0.01, 100)
        self._check(self.gate_norm in GATE_NORMS, "gate_norm", f"one of {GATE_NORMS}")
        self._check(self.gate_norm == "token" or self.granularity == "batch", "gate_norm",
                    "'token' unless granularity is 'batch' (normalising over the sequence lets every token see the "
                    "tokens after it: reproduction only, beside the public code's batch vote)")
        self._check(self.pairs == "next" or (isinstance(self.pairs, (list, tuple)) and len(self.pairs) > 0 and all(
            isinstance(j, int) and not isinstance(j, bool) and j >= 0 for j in self.pairs)), "pairs",
            "'next' or a non-empty list of layer indices")
        self._check(self.gate != "pair" or self.balance_weight == 0, "balance_weight",
                    "0 with gate 'pair' (there is no gate to balance)")
        check_layers(self, "layers", ("all",))
        check_range(self, "balance_weight", 0, MAX_WEIGHT)
        self._check(self.gate_grad in GATE_GRADS, "gate_grad", f"one of {GATE_GRADS}")
        self._check(self.gate_grad != "balance" or self.balance_weight > 0, "gate_grad",
                    "balance_weight > 0 with it (the gate learns from the load-balancing loss alone, so with "
                    "balance_weight 0 it would never train; 0.001-0.01 is typical)")
        self._check(self.gate_grad != "frozen" or self.balance_weight == 0, "balance_weight",
                    "0 with gate_grad 'frozen' (a frozen gate has nothing for the balance loss to train)")
