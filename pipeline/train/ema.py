"""Weight EMA kept on the device, with no host sync per step.

torch.optim.swa_utils.AveragedModel reads its step counter back to the host on every update
(`if self.n_averaged == 0`), a GPU sync per training step. WeightEMA does the same arithmetic as
AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True) and has the same
state_dict (module.* and n_averaged), so checkpoints written with either resume with the other.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightEMA(nn.Module):
    """ema = decay * ema + (1 - decay) * weights, over parameters and buffers; the first update copies."""

    def __init__(self, net: nn.Module, decay: float):
        super().__init__()
        self.module = copy.deepcopy(net)
        device = next(net.parameters()).device
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long, device=device))
        self.decay = decay
        self._started = False  # a host-side mirror of n_averaged > 0: reading the buffer would sync

    def _pairs(self, net: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        ema = [*self.module.parameters(), *self.module.buffers()]
        cur = [t.detach() for t in (*net.parameters(), *net.buffers())]
        return [t.detach() for t in ema], cur

    @torch.no_grad()
    def update_parameters(self, net: nn.Module) -> None:
        ema, cur = self._pairs(net)
        if not self._started:
            torch._foreach_copy_(ema, cur)
            self._started = True
        else:
            floats = [(e, c) for e, c in zip(ema, cur) if e.is_floating_point()]
            if floats:
                torch._foreach_lerp_([e for e, _ in floats], [c for _, c in floats], 1 - self.decay)
            for e, c in zip(ema, cur):
                if not e.is_floating_point():  # num_batches_tracked: as AveragedModel does (truncated)
                    e.copy_(e * self.decay + c * (1 - self.decay))
        self.n_averaged += 1

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict, assign)
        self._started = bool(self.n_averaged.item() > 0)  # once per resume, not per step
        return result
