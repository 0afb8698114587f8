"""What the routers learned: a method's routing statistics over a task's evaluation rows, and their picture."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import ConfigError
from ..tuners import METHODS
from .scorers import evaluate


def record(model, tokenizer, task, rows, batch_size: int = 32) -> dict:
    """Run the rows through the model with routing statistics on; the method's summary of them (Method.routing_record:
    how often each layer is chosen at each mixed layer, or the mean routing weight per ensembled layer)."""
    method = model.method
    if method is None or not method.draws_routing:
        kind = model.method_config.method if model.method_config is not None else "LoRA alone"
        drawn = ", ".join(name for name, (_, cls) in METHODS.items() if cls.draws_routing)
        raise ConfigError(f"routing pictures are drawn for adapters of {drawn}, not {kind}")
    method.reset_stats()
    was, method.recording = method.recording, True
    try:
        evaluate(task, model, tokenizer, rows, batch_size=batch_size, progress=False)
    finally:
        method.recording = was
    return {"method": model.method_config.method, "layers": method.layers, **method.routing_record()}


def draw(model, summary: dict, out: str | Path, title: str | None = None, label: str = "") -> Path:
    """The picture of record()'s summary (label: the run's name, in a legend) as a PNG at `out`; returns its path."""
    from ..plots import layer_weights, routing_heatmap
    title = title or model.method.routing_title
    if summary["picture"] == "layer_choice":
        return routing_heatmap(np.asarray(summary["counts"], dtype=float), summary["layers"], Path(out), title=title)
    if summary["picture"] == "layer_weights":
        curves = {label or summary["label"]: (summary["mean_weights"], summary["weight_std"])}
        return layer_weights(curves, summary["layers"], Path(out), title=title)
    raise ValueError(f"routing record: no picture of kind {summary['picture']!r}")
