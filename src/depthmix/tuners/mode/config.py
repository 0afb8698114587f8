from __future__ import annotations

from dataclasses import dataclass

from ...config import MethodConfig


@dataclass
class MoDEConfig(MethodConfig):
    """Mixture-of-Depths Ensemble tuning (Luo & Specia, arXiv 2410.13077): the last `num_layers` blocks, the
    final one included, each give logits through the shared LM head; the model's logits are their mixture with
    learned routing weights, and the final layer teaches the shallower ones by distillation.

    num_layers: k, how many of the last blocks are ensembled (>= 2).
    mixing: where the layers' mixing weights come from: "token" (a float32 linear layer on the final normalised
        hidden state, weights per token) or "static" (k learnable logits shared by all tokens).
    distill_weight: lambda, weight of the distillation term (0 = off).
    distill_reduction: "sum" (the paper: the KL terms of the shallower layers are added) or "mean" (averaged over
        them, so the term's scale does not grow with num_layers).
    distill_into: "backbone" (the KL's gradient reaches the shallower blocks, and LoRA in them) or "norms" (the
        shallower hidden states are detached: distillation trains only their norms).
    temperature: tau of the distillation term.
    init_final_weight: routing weight of the final layer at initialisation (the rest is shared equally by the
        other layers); close to 1 keeps the untrained model close to the base model.
    chunk_size: labelled tokens per chunk of the distillation term (bounds its memory: chunk_size x vocab).
    """

    method = "mode"
    renamed = {"router": "mixing"}  # its old name, still read from saved adapters and config files
    num_layers: int = 3
    mixing: str = "token"
    distill_weight: float = 1.0
    distill_reduction: str = "sum"
    distill_into: str = "backbone"
    temperature: float = 1.0
    init_final_weight: float = 0.98
    chunk_size: int = 256

    def validate(self) -> None:
        self._check(_is_int(self.num_layers) and self.num_layers >= 2, "num_layers", "an integer >= 2")
        self._check(self.mixing in ("token", "static"), "mixing", "'token' or 'static'")
        self._check(_is_num(self.distill_weight) and self.distill_weight >= 0, "distill_weight", "a number >= 0")
        self._check(self.distill_reduction in ("sum", "mean"), "distill_reduction", "'sum' or 'mean'")
        self._check(self.distill_into in ("backbone", "norms"), "distill_into", "'backbone' or 'norms'")
        self._check(_is_num(self.temperature) and self.temperature > 0, "temperature", "a number > 0")
        self._check(_is_num(self.init_final_weight) and 0 < self.init_final_weight < 1, "init_final_weight",
                    "a number strictly between 0 and 1")
        self._check(_is_int(self.chunk_size) and self.chunk_size >= 1, "chunk_size", "an integer >= 1")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
