"""What the routers learned: a method's routing statistics over a task's evaluation rows, and their picture."""
from __future__ import annotations

from pathlib import Path

from ..config import ConfigError


def record(model, tokenizer, task, rows, batch_size: int = 32) -> dict:
    """Run the rows through the model with routing statistics on; the method's summary of them (MoLEx: how often
    each layer is chosen at each mixed layer; MoDE: mean routing weight per ensembled layer)."""
    method = model.method
    if method is None or not method.draws_routing:
        kind = model.method_config.method if model.method_config is not None else "LoRA alone"
        raise ConfigError(f"routing pictures are drawn for MoLEx and MoDE adapters, not {kind}")
    method.reset_stats()
    was, method.recording = method.recording, True
    try:
        task.evaluate(model, tokenizer, rows, batch_size=batch_size, progress=False)
    finally:
        method.recording = was
    return {"method": model.method_config.method, "layers": method.layers, **method.routing_record()}


def draw(model, summary: dict, out: str | Path, title: str | None = None, label: str = "") -> Path:
    return model.method.draw_routing(summary, Path(out), title or model.method.routing_title, label)
