"""Distributed jobs with adaptive clipping (run by tests/distributed/test_adaptive.py on every rank)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fxdp
from tests.distributed.jobs import _loader, flat_params, make_model, run_epochs
from tests.training.stack_helpers import median_R

ADAPTIVE = dict(target_unclipped_quantile=0.7, clipbound_learning_rate=0.5)


def train_adaptive(rank, world_size, *, n=24, q=0.25, sigma=0.0, count_std=0.0, noise_seed=None, epochs=2,
                   micro=None, seed=0):
    """Like jobs.train with clipping="adaptive": per step the local indices, R, the released fraction, params."""
    torch.manual_seed(1000 + rank)
    x, y, base_loader = _loader(n, q, seed)
    model = make_model(seed)
    R = median_R(model, x, y)
    dp = fxdp.DPDistributed()
    gen = torch.Generator().manual_seed(noise_seed) if noise_seed is not None else None
    module, opt, loader = dp.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9), data_loader=base_loader,
        noise_multiplier=sigma, max_grad_norm=R, noise_generator=gen, sample_rate=q, clipping="adaptive",
        count_noise_multiplier=count_std, **ADAPTIVE)
    out = {"R": R, "E": dp.expected_batch_size, "indices": [], "params": [flat_params(model)], "bounds": [],
           "fractions": []}

    def on_step():
        out["bounds"].append(opt.last_release["max_grad_norm"])
        out["fractions"].append(opt.last_release["unclipped_fraction"])

    run_epochs(dp, model, module, opt, loader, out, epochs=epochs, micro=micro, on_step=on_step)
    return out


def resume_adaptive(rank, world_size, *, path, n=24, q=0.25):
    """Epoch 0, checkpoint, epoch 1; then fresh objects load the checkpoint and redo epoch 1: (params, R) each."""

    def setup(init_seed):
        x, y, base_loader = _loader(n, q, seed=0)
        model = make_model(init_seed)
        dp = fxdp.DPDistributed()
        model, opt, loader = dp.make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9), data_loader=base_loader,
            noise_multiplier=0.8, max_grad_norm=0.3, sample_rate=q, clipping="adaptive", count_noise_multiplier=1.0,
            **ADAPTIVE)
        return dp, model, opt, loader

    def epoch(model, opt, loader):
        bounds = []
        for xb, yb, _ in loader:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            bounds.append(opt.max_grad_norm)
        return bounds

    torch.manual_seed(50 + rank)
    dp, model, opt, loader = setup(0)
    epoch(model, opt, loader)
    dp.save_checkpoint(path=path, module=model, optimizer=opt)
    saved_R = opt.max_grad_norm
    uninterrupted = (flat_params(model), epoch(model, opt, loader))
    torch.manual_seed(999)
    dp, model, opt, loader = setup(1)
    dp.load_checkpoint(path=path, module=model, optimizer=opt)
    loaded_R = opt.max_grad_norm
    return {"uninterrupted": uninterrupted, "resumed": (flat_params(model), epoch(model, opt, loader)),
            "saved_R": saved_R, "loaded_R": loaded_R}
