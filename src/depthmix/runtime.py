"""Small things every evaluation path needs: the model's device, and eval mode for the duration of a block."""
from __future__ import annotations

import contextlib

import torch


def device_of(model) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def evaluating(model):
    """model.eval() inside the block, its previous training flag restored after (also on an exception)."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)
