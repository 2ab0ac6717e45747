"""A stand-in for what an adapter library (PEFT's LoRA, LN tuning) puts in a layer's place: the layer
inside, its own forward around it adding an update, and the layer's attributes (``weight``, ``bias``)
reachable through it as PEFT's are - which is what let a fused forward read the bare weight and skip the
update without a word."""

import torch.nn as nn


class AdapterStandIn(nn.Module):
    def __init__(self, base: nn.Module, shift: float = 0.25):
        super().__init__()
        self.base_layer = base
        self.shift = shift

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["base_layer"], name)

    def forward(self, *args, **kwargs):
        return self.base_layer(*args, **kwargs) + self.shift
