"""Counting host syncs on a CPU: every call that reads a tensor's value back into Python.

On a GPU each of these waits for the device to finish its queue. On a CPU they cost nothing, but they are the
same calls, so a TorchFunctionMode that counts them during a stage run finds the per-step syncs a GPU would pay.
"""

from __future__ import annotations

import traceback
from collections import Counter

from torch.overrides import TorchFunctionMode

READS = {"item", "tolist", "numpy", "cpu", "nonzero", "__bool__", "__float__", "__int__", "__index__"}


class HostReads(TorchFunctionMode):
    """`with HostReads() as reads: ...` -> reads.calls: Counter of 'name file:line' per value read."""

    def __init__(self):
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS:
            caller = traceback.extract_stack(limit=2)[0]
            self.calls[f"{name} {caller.filename.rsplit('/', 2)[-1]}:{caller.lineno}"] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.calls.values())
