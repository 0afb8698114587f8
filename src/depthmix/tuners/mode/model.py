"""MoDE wired into a model: per-layer norms, the router, the ensemble at the final norm, the distillation term."""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ...config import ConfigError
from ...architectures import UnsupportedModelError
from ..base import Method, float32_linear
from .layer import MoDECapture, MoDENorm, distill_sum
from .lens import layer_lens


class MoDE(Method):
    """Ensembles blocks T-k .. T-1. Parameters: norms[i] for block T-k+i (i < k-1; the final block keeps the
    model's own frozen final norm) and the router, all float32."""

    draws_routing = True
    routing_title = "MoDE routing weights (± std over tokens)"
    compact_on_cpu = True  # False: the accelerator's sync-free path (every row, masked) on a CPU too

    def __init__(self, config, arch, hidden_size: int):
        super().__init__(config, arch)
        if not arch.causal or arch.norm is None or arch.head_path != "lm_head":
            raise UnsupportedModelError(
                f"MoDE needs a causal LM with a final norm and an LM head (lm_head); this {arch.family.name} model "
                f"has norm={arch.norm_path!r}, head={arch.head_path!r}")
        k, total = config.num_layers, arch.num_layers
        if k > total:
            raise ConfigError(f"MoDEConfig.num_layers = {k}: the model has only {total} blocks")
        self.layers = list(range(total - k, total))
        self.norms = nn.ModuleList(copy.deepcopy(arch.norm).float().requires_grad_(True) for _ in range(k - 1))
        bias = torch.zeros(k)
        bias[-1] = math.log(config.init_final_weight * (k - 1) / (1 - config.init_final_weight))
        if config.mixing == "token":
            self.router = float32_linear(hidden_size, k, zero=True)
            with torch.no_grad():
                self.router.bias.copy_(bias)
        else:
            self.router_logits = nn.Parameter(bias)
        self.captured: dict[int, torch.Tensor] = {}
        self.recording = True  # routing statistics of every evaluation-mode forward (cheap: sums over k weights)
        self.reset_stats()
        for i, t in enumerate(self.layers[:-1]):
            self.wrap(arch.blocks[t + 1], MoDECapture, i)
        self.wrap(arch.norm, MoDENorm, k - 1)

    def capture(self, index: int, hidden: torch.Tensor) -> None:
        self.captured[index] = hidden

    def begin(self, inputs: dict) -> None:
        super().begin(inputs)
        self.captured = {}

    def finish(self, output):
        self.captured = {}
        return super().finish(output)

    def routing_weights(self, final: torch.Tensor) -> torch.Tensor:
        """[B, S, k] from the final normalised hidden state (token router), or [k] (static router)."""
        if self.config.mixing == "token":
            return self.router(final.float()).softmax(-1)
        return self.router_logits.softmax(-1)

    # -- the ensemble, at the final norm ---------------------------------------------------------------------
    def ensemble(self, hidden: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
        k = self.config.num_layers
        missing = [self.layers[i] for i in range(k - 1) if i not in self.captured]
        if missing:
            raise RuntimeError(f"MoDE: the outputs of blocks {missing} were not seen before the final norm")
        hs = [self.captured.pop(i) for i in range(k - 1)]
        normed = [norm(h.float()) for norm, h in zip(self.norms, hs)] + [final.float()]
        w = self.routing_weights(final)
        mixed = sum((w[..., i, None] if w.dim() > 1 else w[i]) * n for i, n in enumerate(normed))
        if self.recording and not self.training:
            self._record(w.detach(), final)
        if self.training and self.config.distill_weight > 0:
            if self.config.distill_into == "norms":  # the KL's gradient stops at the norms
                normed = [norm(h.detach().float()) for norm, h in zip(self.norms, hs)] + [final]
            self._distill(final, normed[:-1])
        return mixed.to(final.dtype)

    def _distill(self, final: torch.Tensor, students: list[torch.Tensor]) -> None:
        keep = self.labelled(final)
        if keep is None:
            return
        width = final.shape[-1]
        teacher, students = final.reshape(-1, width), [s.reshape(-1, width) for s in students]
        if final.is_cpu and self.compact_on_cpu:
            # No device to wait for on a CPU: score the labelled rows only (a prompt is often most of a row).
            rows = keep.reshape(-1).nonzero().squeeze(1)
            teacher, students, weight = teacher[rows], [s[rows] for s in students], None
            count = rows.numel()
        else:
            # Static shapes on an accelerator: every row, unlabelled ones weighted 0 (no host sync for a count).
            weight = keep.reshape(-1).to(torch.float32)
            count = weight.sum()
        total = distill_sum(teacher, students, self.arch.head, self.config.temperature, self.config.chunk_size,
                            weight)
        if self.config.distill_reduction == "mean":
            total = total / len(students)
        items = self.inputs.get("num_items_in_batch")  # the Trainer's count over the whole accumulated batch
        count = count if items is None else items
        count = count.to(total.device).clamp(min=1) if torch.is_tensor(count) else max(count, 1)
        self.add_aux(self.config.distill_weight * total / count)

    def labelled(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """[B, S] bool: the positions whose logits are scored by the causal LM loss (label of the next token set);
        None without labels."""
        target = self.inputs.get("shift_labels")
        if target is None:
            labels = self.inputs.get("labels")
            if labels is None:
                return None
            target = F.pad(labels[:, 1:], (0, 1), value=-100)
        if target.shape != hidden.shape[:2]:
            raise RuntimeError(f"MoDE: labels of shape {tuple(target.shape)} do not match the hidden states "
                               f"{tuple(hidden.shape[:2])}")
        return target.to(hidden.device) != -100

    # -- routing statistics ----------------------------------------------------------------------------------
    def _record(self, w: torch.Tensor, final: torch.Tensor) -> None:
        valid = self.valid_mask(final)
        w = (w[valid] if w.dim() > 1 else w.expand(int(valid.sum()), -1)).double()
        self.weight_sum += w.sum(0).cpu()
        self.weight_sq += w.square().sum(0).cpu()
        self.weight_count += w.shape[0]

    def reset_stats(self) -> None:
        k = self.config.num_layers
        self.weight_sum = torch.zeros(k, dtype=torch.float64)
        self.weight_sq = torch.zeros(k, dtype=torch.float64)
        self.weight_count = 0

    def weight_std(self) -> list[float]:
        """Standard deviation over tokens of each layer's routing weight (recorded in evaluation mode)."""
        if not self.weight_count:
            return [0.0] * self.config.num_layers
        mean = self.weight_sum / self.weight_count
        return (self.weight_sq / self.weight_count - mean.square()).clamp(min=0).sqrt().tolist()

    def mean_weights(self) -> list[float]:
        """Mean routing weight of each ensembled layer over the (valid) tokens of the evaluation-mode forwards since
        the last reset_stats(); with none recorded, the static weights or, for the token router, its bias's."""
        if self.weight_count:
            return (self.weight_sum / self.weight_count).tolist()
        if self.config.mixing == "static":
            return self.router_logits.detach().softmax(-1).tolist()
        return self.router.bias.detach().softmax(-1).tolist()

    def routing_record(self) -> dict:
        return {"picture": "layer_weights", "label": "MoDE", "mean_weights": self.mean_weights(),
                "weight_std": self.weight_std(), "tokens": self.weight_count}

    def layer_lens(self, model, batches) -> dict:
        return layer_lens(model, batches)

    def summary(self) -> dict:
        state = {f"weight/{t}": w for t, w in zip(self.layers, self.mean_weights())}
        state.update({f"weight_std/{t}": s for t, s in zip(self.layers, self.weight_std())})
        state["weight_tokens"] = self.weight_count
        return state
