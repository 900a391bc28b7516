"""Helpers shared by the scheduler tests: a small converted MLP and optimizer views."""

import torch
from torch import nn
from torch.nn import functional as F

from dynrank.convert import convert_model


def mlp(seed=0, d_in=12, width=24):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                          nn.Linear(width, 3))
    convert_model(model, rank_ratio=0.25)
    return model


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def held(optimizer):
    return [p for g in optimizer.param_groups for p in g["params"]]


def same_set(a, b):
    return sorted(map(id, a)) == sorted(map(id, b))


def train_steps(model, optimizer, x, y, steps=3):
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
