"""Small models for the report tests: covered, refused (uncovered / sample-mixing)."""
from __future__ import annotations

import torch
import torch.nn as nn


class UncoveredParam(nn.Module):
    """A trainable parameter broadcast against the batch by torch.broadcast_tensors: a tuple result,
    which neither a rule nor the per-sample fallback covers. (A batch-free ``torch.unbind(self.w)``
    is covered: a virtual parameter.)"""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.w = nn.Parameter(torch.randn(4) / 3)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h, w = torch.broadcast_tensors(self.fc(x)[:, :4], self.w)
        return self.head(h * w)


class BatchNormTrain(nn.Module):
    """BatchNorm in training mode: statistics of the whole batch mix samples."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.fc(x))))


class BatchMean(nn.Module):
    """Subtracts the batch mean: no parameter involved, but samples are mixed."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = self.fc(x)
        return self.head(h - h.mean(0, keepdim=True))


class WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 2)
        self.spare = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(x)


def refused_factory(batch_size: int = 4):
    """CLI factory of a model privatize refuses."""
    torch.manual_seed(0)
    return UncoveredParam(), (torch.randn(batch_size, 6),)
