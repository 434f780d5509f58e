"""Next-token agreement between a reference model and a quantized one."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class Agreement:
    """Accumulates, over predicted positions: NLL of the real next token, KL(ref ‖ test) over the
    full vocabulary, and whether the argmax tokens agree."""

    nll: float = 0.0
    kl: float = 0.0
    top1: int = 0
    count: int = 0
    per_position_kl: list[float] = field(default_factory=list, repr=False)

    def add(self, ref_logits: torch.Tensor, test_logits: torch.Tensor, targets: torch.Tensor) -> None:
        """logits [T, V] predicting targets [T]."""
        ref = torch.log_softmax(ref_logits.float(), -1)
        test = torch.log_softmax(test_logits.float(), -1)
        self.nll -= test.gather(-1, targets.view(-1, 1)).sum().item()
        kl = (ref.exp() * (ref - test)).sum(-1)
        self.kl += kl.sum().item()
        self.top1 += (ref.argmax(-1) == test.argmax(-1)).sum().item()
        self.count += targets.numel()

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / max(self.count, 1))

    @property
    def mean_kl(self) -> float:
        return self.kl / max(self.count, 1)

    @property
    def top1_agreement(self) -> float:
        return self.top1 / max(self.count, 1)
