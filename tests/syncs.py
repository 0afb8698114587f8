"""Counting the ops that make a GPU wait for its host (a device->host copy of a value or a shape), on a CPU."""
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# .item()/.tolist()/bool(tensor) go through _local_scalar_dense; the others have data-dependent output shapes
SYNC_OPS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique_dim",
            "aten._unique2", "aten.unique_consecutive", "aten.repeat_interleave", "aten.index_put_with_bool",
            "aten.equal", "aten.is_nonzero"}


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._overloadpacket._qualified_op_name.replace("::", ".")
        if name in SYNC_OPS or (name == "aten.index" and _bool_index(args)):
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


def count_syncs(step) -> Counter:
    with SyncCounter() as counter:
        step()
    return counter.ops
