from __future__ import annotations

from dataclasses import dataclass, field

from ...config import MAX_WEIGHT, MethodConfig, check_range


@dataclass
class MoDEConfig(MethodConfig):
    """Mixture-of-Depths Ensemble tuning (Luo & Specia, arXiv 2410.13077): the last `num_layers` blocks, the
    final one included, each give logits through the shared LM head; the model's logits are their mixture with
    learned routing weights, and the final layer teaches the shallower ones by distillation.
    """

    method = "mode"
    renamed = {"router": "mixing"}  # its old name, still read from saved adapters and config files
    num_layers: int = field(default=3, metadata={"help": "k, how many of the last blocks are ensembled (>= 2)."})
    mixing: str = field(default="token", metadata={"help":
        "where the layers' mixing weights come from: 'token' (a float32 linear layer on the final normalised "
        "hidden state, weights per token) or 'static' (k learnable logits shared by all tokens)."})
    distill_weight: float = field(default=1.0, metadata={"help": "lambda, weight of the distillation term (0 = off)."})
    distill_reduction: str = field(default="sum", metadata={"help":
        "'sum' (the paper: the KL terms of the shallower layers are added) or 'mean' (averaged over them, so the "
        "term's scale does not grow with num_layers)."})
    distill_into: str = field(default="backbone", metadata={"help":
        "'backbone' (the KL's gradient reaches the shallower blocks, and LoRA in them) or 'norms' (the shallower "
        "hidden states are detached: distillation trains only their norms)."})
    temperature: float = field(default=1.0, metadata={"help": "tau of the distillation term."})
    init_final_weight: float = field(default=0.98, metadata={"help":
        "routing weight of the final layer at initialisation (the rest is shared equally by the other layers); close "
        "to 1 keeps the untrained model close to the base model."})
    chunk_size: int = field(default=256, metadata={"help":
        "labelled tokens per chunk of the distillation term (bounds its memory: chunk_size x vocab)."})

    def validate(self) -> None:
        self._check(self.num_layers >= 2, "num_layers", "an integer >= 2")
        self._check(self.mixing in ("token", "static"), "mixing", "'token' or 'static'")
        check_range(self, "distill_weight", 0, MAX_WEIGHT)
        self._check(self.distill_reduction in ("sum", "mean"), "distill_reduction", "'sum' or 'mean'")
        self._check(self.distill_into in ("backbone", "norms"), "distill_into", "'backbone' or 'norms'")
        check_range(self, "temperature", 0.01, 100)  # logits / tau: 1e-200 gives NaN, 1e200 overflows
        self._check(0 < self.init_final_weight < 1, "init_final_weight", "a number strictly between 0 and 1")
        self._check(self.chunk_size >= 1, "chunk_size", "an integer >= 1")
