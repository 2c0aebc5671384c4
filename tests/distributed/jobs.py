"""Jobs the distributed tests run on every rank of the cluster (tests/distributed/cluster.py).

Each job is ``job(rank, world_size, **kwargs)`` and returns plain data (tensors,
lists, numbers); the tests compare the ranks' results with each other and with
a single-process replay (tests/distributed/replay.py).
"""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import fxdp
from fxdp.distributed import DistributedDPOptimizer
from tests import models_zoo as Z
from tests.training.stack_helpers import median_R, per_sample_norms


def make_data(n: int, seed: int = 0, d_in: int = 6, classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def make_model(seed: int = 0, wide: bool = False):
    torch.manual_seed(seed)
    return (Z.MLP(hidden=64) if wide else Z.MLP()).double()


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def _loader(n, q, seed):
    x, y = make_data(n, seed)
    return x, y, DataLoader(TensorDataset(x, y, torch.arange(n)), batch_size=max(1, int(q * n)))


def run_epochs(dp, model, module, opt, loader, out, *, epochs, micro=None, on_batch=None, on_step=None):
    """The jobs' training loop: ``epochs`` epochs of the distributed Poisson ``loader`` (through a
    ``BatchMemoryManager`` of ``micro`` rows when given), cross-entropy on ``module``. Per step it appends
    the local indices drawn for it to ``out["indices"]`` and ``model``'s parameters to ``out["params"]``,
    then calls ``on_step()``; ``on_batch(indices)`` sees every physical batch. Sets ``out["eps"]``."""
    pending = []
    for epoch in range(epochs):
        loader.batch_sampler.set_epoch(epoch)
        manager = (fxdp.BatchMemoryManager(data_loader=loader, max_physical_batch_size=micro, optimizer=opt)
                   if micro else contextlib.nullcontext(loader))
        with manager as batches:
            for xb, yb, ib in batches:
                if on_batch is not None:
                    on_batch(ib)
                pending += ib.tolist()
                opt.zero_grad()
                F.cross_entropy(module(xb), yb).backward()
                before = opt.steps_taken
                opt.step()
                if opt.steps_taken > before:
                    out["indices"].append(pending)
                    pending = []
                    out["params"].append(flat_params(model))
                    if on_step is not None:
                        on_step()
    out["eps"] = dp.get_epsilon(1e-5)


def train(rank, world_size, *, n=24, q=0.25, sigma=0.0, seed=0, epochs=1, micro=None, compile=False,
          style="all-layer", noise_seed=None, momentum=0.9, lr=0.5, verify=False, secure=False):
    """Train on the distributed Poisson loader; record each step's local indices and the parameters."""
    torch.manual_seed(1000 + rank)  # ranks' own randomness differs, as in a real launch
    x, y, base_loader = _loader(n, q, seed)
    model = make_model(seed)
    R = median_R(model, x, y)
    if rank == 1:
        with torch.no_grad():  # rank 0's parameters must win the setup broadcast
            for p in model.parameters():
                p.add_(1.0)
    run = model
    if compile:
        fxdp.privatize(model, style=style, max_grad_norm=R)
        run = torch.compile(model, backend="fxdp", options={"compiler": "aot_eager"})
    dp = fxdp.DPDistributed(secure_mode=secure)
    gen = torch.Generator().manual_seed(noise_seed) if noise_seed is not None else None
    module, opt, loader = dp.make_private(
        module=run, optimizer=torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum), data_loader=base_loader,
        noise_multiplier=sigma, max_grad_norm=R, style=style, noise_generator=gen, sample_rate=q)
    out = {"R": R, "E": dp.expected_batch_size, "indices": [], "params": [flat_params(model)], "empty": 0,
           "local_batches": 0}

    def on_batch(ib):
        out["local_batches"] += 1
        out["empty"] += int(len(ib) == 0)

    run_epochs(dp, model, module, opt, loader, out, epochs=epochs, micro=micro, on_batch=on_batch,
               on_step=dp.verify_replicas if verify else None)
    out["steps"] = opt.steps_taken
    out["buckets"] = opt.last_num_buckets
    return out


def noise_in_updates(rank, world_size, *, steps=10, sigma=1.3, n=64, q=0.1, bucket_cap_mb=0.002):
    """Per step, the noise in p.grad: p.grad - (sum over ranks of the clipped sums) / E, flattened."""
    torch.manual_seed(7 + rank)
    x, y, base_loader = _loader(n, q, seed=5)
    model = make_model(0, wide=True)
    R = median_R(model, x, y)
    dp = fxdp.DPDistributed()
    model, opt, loader = dp.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                         data_loader=base_loader, noise_multiplier=sigma, max_grad_norm=R,
                                         sample_rate=q, bucket_cap_mb=bucket_cap_mb)
    noises, params = [], []
    it = iter(loader)
    for _ in range(steps):
        xb, yb, _ = next(it)
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        clipped = torch.cat([p.private_grad.reshape(-1) for p in model.parameters()]).clone()
        dist.all_reduce(clipped)
        opt.step()
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        noises.append(grads - clipped / dp.expected_batch_size)
        params.append(flat_params(model))
        dp.verify_replicas()
    return {"noise": torch.stack(noises), "params": torch.stack(params), "R": R, "E": dp.expected_batch_size,
            "buckets": opt.last_num_buckets}


def setup_variant(rank, world_size, *, kind):
    """make_private where rank 1 differs from rank 0 in ``kind``."""
    x, y, base_loader = _loader(24, 0.25, seed=0)
    odd = rank == 1
    model = make_model(0, wide=(kind == "width" and odd))
    kwargs = dict(noise_multiplier=1.0 + (0.5 if kind == "sigma" and odd else 0.0), max_grad_norm=0.7,
                  style="layer-wise" if kind == "style" and odd else "all-layer")
    if kind == "bad-argument" and odd:
        kwargs["style"] = "no-such-style"
    if kind == "dataset" and odd:
        x, y, base_loader = _loader(30, 0.2, seed=0)
    if kind == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    fxdp.DPDistributed().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                      data_loader=base_loader, **kwargs)
    return "set up"


def ddp_around_privatized(rank, world_size, *, inner):
    """DDP wrapped around a privatized model (or a privatized ``ddp.module``): the forward is refused."""
    x, y, _ = _loader(8, 0.5, seed=0)
    model = make_model(0)
    if inner:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        fxdp.privatize(ddp.module, max_grad_norm=1.0)
    else:
        ddp = torch.nn.parallel.DistributedDataParallel(fxdp.privatize(model, max_grad_norm=1.0))
    ddp(x)
    return "trained"


def step_failure(rank, world_size, *, kind):
    """A step that fails on rank 1 only; afterwards a collective checks that the group still works."""
    x, y, base_loader = _loader(24, 0.25, seed=0)
    model = make_model(0)
    dp = fxdp.DPDistributed()
    model, opt, loader = dp.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                         data_loader=base_loader, noise_multiplier=1.0, max_grad_norm=0.7)
    if kind == "frozen" and rank == 1:
        model.fc2.bias.requires_grad_(False)
    if kind == "lr" and rank == 1:
        torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5).step()
    if kind == "sigma" and rank == 1:
        opt.noise_multiplier = 0.5
    error = None
    try:
        it = iter(loader)
        xb, yb, _ = next(it)
        opt.zero_grad()
        if not (kind == "no-backward" and rank == 1):
            F.cross_entropy(model(xb), yb).backward()
        if kind == "two-batches" and rank == 1:
            next(it)
        opt.step()
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    probe = torch.ones(1)
    dist.all_reduce(probe)
    return {"error": error, "group_alive": float(probe) == world_size}


def neighbour_move(rank, world_size, *, duplicate=False, n=12):
    """Noise off, lr 1: ||update(D) - update(D minus example j)|| on 2 ranks, where j is a clipped example.

    ``duplicate=True`` simulates what a non-distributed sampler does: example j sits on BOTH ranks."""
    x, y = make_data(n, seed=3)
    model = make_model(0)
    R = median_R(model, x, y)
    norms = per_sample_norms(model, x, y)
    j = max(range(n // 2, n), key=lambda i: norms[i])  # the largest norm on rank 1's shard: clipped
    shard = list(range(rank * n // 2, (rank + 1) * n // 2))
    if duplicate and rank == 0:
        shard.append(j)

    def update(idx):
        m = fxdp.privatize(copy.deepcopy(model), max_grad_norm=R)
        opt = DistributedDPOptimizer(torch.optim.SGD(m.parameters(), lr=1.0), 0.0, R, expected_batch_size=n)
        F.cross_entropy(m(x[idx]), y[idx]).backward()
        opt.step()
        return flat_params(model) - flat_params(m)

    with_j = update(shard)
    without_j = update([i for i in shard if i != j])
    return {"move": float((with_j - without_j).norm()), "R": R, "E": float(n), "norm_j": norms[j]}


def shards(rank, world_size, *, n=25, q=0.3, epochs=3, steps=20):
    """This rank's shard per epoch and every index its loader handed out."""
    x, y, base_loader = _loader(n, q, seed=0)
    model = make_model(0)
    dp = fxdp.DPDistributed()
    model, opt, loader = dp.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                         data_loader=base_loader, noise_multiplier=1.0, max_grad_norm=0.7,
                                         sample_rate=q)
    sampler = loader.batch_sampler
    out = {"shards": [], "drawn": [], "batches_per_epoch": []}
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        out["shards"].append(sampler.shard().tolist())
        drawn = [list(b) for b in sampler]
        out["batches_per_epoch"].append(len(drawn))
        out["drawn"].append(sorted(i for b in drawn for i in b))
    g = sampler.generator.get_state()
    out["generator_state"] = g
    return out


def resume(rank, world_size, *, path, sigma=0.8, n=24, q=0.25):
    """Epoch 0, checkpoint, epoch 1 (uninterrupted); then fresh objects load the checkpoint and redo epoch 1."""

    def setup(init_seed):
        x, y, base_loader = _loader(n, q, seed=0)
        model = make_model(init_seed)
        dp = fxdp.DPDistributed()
        model, opt, loader = dp.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5,
                                                                                     momentum=0.9),
                                             data_loader=base_loader, noise_multiplier=sigma, max_grad_norm=0.3,
                                             sample_rate=q)
        return dp, model, opt, loader

    def epoch(model, opt, loader, trace):
        for xb, yb, ib in loader:
            opt.zero_grad()
            F.cross_entropy(F.dropout(model(xb), 0.2), yb).backward()
            opt.step()
            trace.append(ib.tolist())

    torch.manual_seed(50 + rank)
    dp, model, opt, loader = setup(0)
    epoch(model, opt, loader, [])
    dp.save_checkpoint(path=path, module=model, optimizer=opt, checkpoint_dict={"note": torch.tensor([rank])})
    first = []
    epoch(model, opt, loader, first)
    uninterrupted = (flat_params(model), dp.get_epsilon(1e-5), first)

    torch.manual_seed(999)
    dp, model, opt, loader = setup(1)
    extra = dp.load_checkpoint(path=path, module=model, optimizer=opt)
    second = []
    epoch(model, opt, loader, second)
    return {"uninterrupted": uninterrupted, "resumed": (flat_params(model), dp.get_epsilon(1e-5), second),
            "extra": extra["note"].tolist()}


def subset_shards(rank, world_size, *, n=30, q=0.3, epochs=3):
    """A train split given as a SubsetRandomSampler: what this rank's loader draws, and the expected batch."""
    from torch.utils.data import SubsetRandomSampler

    x, y = make_data(n, 0)
    train = list(range(0, n, 3))
    base = DataLoader(TensorDataset(x, y, torch.arange(n)), batch_size=3, sampler=SubsetRandomSampler(train))
    model = make_model(0)
    dp = fxdp.DPDistributed()
    model, opt, loader = dp.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                         data_loader=base, noise_multiplier=1.0, max_grad_norm=0.7, sample_rate=q)
    drawn = []
    for epoch in range(epochs):
        loader.batch_sampler.set_epoch(epoch)
        drawn.extend(int(i) for _, _, idx in loader for i in idx)
        opt.batch_check.reset()
    return {"drawn": sorted(set(drawn)), "train": train, "expected_batch_size": opt.expected_batch_size,
            "shard": loader.batch_sampler.shard().tolist()}
