"""Jobs for the FSDP2 tests (run on every rank by tests/distributed/cluster.py), and the single-process
replay they are compared with.

Models: a small MLP of residual blocks (``mlp``), GPT-2 built from config with tied wte/lm_head
(``gpt2``), and a LoRA-adapted Llama (``lora-llama``, PEFT). Every rank builds the same model from the
same seed, then ``fully_shard`` s each block and the root, as FSDP2 users do.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import fxdp
from examples.models import ResidualMLP
from tests import models_zoo as Z
from tests.training.stack_helpers import median_R, per_sample_norms


def block_mlp(d: int = 9):
    """The residual-block MLP of the FSDP jobs (6 inputs, 2 blocks, 3 classes), float64."""
    return ResidualMLP(d_in=6, d=d, blocks=2, classes=3).double()


def _llama_lora():
    import peft
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    base = transformers.LlamaForCausalLM(cfg).double()
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                      lora_dropout=0.0))
    with torch.no_grad():  # lora_B starts at zero: make lora_A's gradient non-trivial
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    return model


def build(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "mlp":
        return block_mlp()
    if kind == "gpt2":
        return Z.gpt2(n_layer=2, d=16, vocab=40, T=8)
    if kind == "lora-llama":
        return _llama_lora()
    raise ValueError(kind)


def blocks_of(model):
    if isinstance(model, ResidualMLP):
        return list(model.blocks)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "transformer"):
        return list(base.transformer.h)
    return list(base.model.layers)


def data(kind: str, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed + 1)
    if kind == "mlp":
        return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)
    ids = torch.randint(0, 40, (n, 8), generator=g)
    return ids, ids


def loss_fn(kind, model, x, y):
    if kind == "mlp":
        return F.cross_entropy(model(x), y)
    logits = model(input_ids=x).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1))  # equal T: per-sample mean


def threshold(kind, model, x, y):
    if kind == "mlp":
        return median_R(model, x, y)
    return 0.05 if kind == "gpt2" else 0.02  # near the median per-sample norm at this size (checked by the tests)


def shard(model, reshard=True, mp=None):
    from torch.distributed.fsdp import fully_shard
    kwargs = dict(reshard_after_forward=reshard)
    if mp is not None:
        kwargs["mp_policy"] = mp
    for b in blocks_of(model):
        fully_shard(b, **kwargs)
    fully_shard(model, **kwargs)
    return model


def full_params(model) -> torch.Tensor:
    """Every trainable parameter, gathered in full (collective for DTensors), flattened in order."""
    out = []
    for p in model.parameters():
        if p.requires_grad:
            t = p.full_tensor() if hasattr(p, "full_tensor") else p
            out.append(t.detach().reshape(-1).to(torch.float64))
    return torch.cat(out).clone()


def make_optimizer(kind, params, lr):
    params = [p for p in params if p.requires_grad]
    if kind == "gpt2":
        return torch.optim.AdamW(params, lr=lr * 0.02, weight_decay=0.0)
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def batches(loader, steps):
    """``steps`` local batches, over as many epochs as needed."""
    epoch = 0
    while True:
        loader.batch_sampler.set_epoch(epoch)
        for b in loader:
            yield b
            steps -= 1
            if steps == 0:
                return
        epoch += 1


def train(rank, world_size, *, kind="mlp", style="all-layer", n=24, q=0.25, steps=3, sigma=0.0, reshard=True,
          privatize_first=False, lr=0.5, mixed=False, noise_seed=None):
    torch.manual_seed(100 + rank)  # the ranks' own randomness differs, as in a real launch
    x, y = data(kind, n)
    model = build(kind)
    R = threshold(kind, model, x, y)
    if privatize_first:
        fxdp.privatize(model, style=style, max_grad_norm=R)
    mp = None
    if mixed:
        from torch.distributed.fsdp import MixedPrecisionPolicy
        model = model.float()
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    shard(model, reshard=reshard, mp=mp)
    loader = DataLoader(TensorDataset(x, y, torch.arange(n)), batch_size=max(1, int(q * n)))
    dp = fxdp.DPDistributed()
    gen = torch.Generator().manual_seed(noise_seed) if noise_seed is not None else None
    model, opt, loader = dp.make_private(module=model, optimizer=make_optimizer(kind, model.parameters(), lr),
                                         data_loader=loader, noise_multiplier=sigma, max_grad_norm=R, style=style,
                                         sample_rate=q, noise_generator=gen)
    out = {"R": R, "E": dp.expected_batch_size, "indices": [], "params": [full_params(model)], "grads": []}
    for xb, yb, ib in batches(loader, steps):
        opt.zero_grad()
        loss_fn(kind, model, xb, yb).backward()
        out["private_dtypes"] = sorted({str(p.private_grad.dtype) for p in model.parameters() if p.requires_grad})
        opt.step()
        out["indices"].append(ib.tolist())
        out["params"].append(full_params(model))
        out["grad_types"] = sorted({type(p.grad).__name__ for p in model.parameters() if p.grad is not None})
    out["eps"] = dp.get_epsilon(1e-5)
    return out


def replay(ranks, *, kind="mlp", style="all-layer", n=24, lr=0.5):
    """One process, fxdp.DPOptimizer, the ranks' global batches (rank 0's examples, then rank 1's ...)."""
    x, y = data(kind, n)
    model = fxdp.privatize(build(kind), style=style, max_grad_norm=ranks[0]["R"])
    opt = fxdp.DPOptimizer(make_optimizer(kind, model.parameters(), lr), 0.0, ranks[0]["R"],
                           expected_batch_size=ranks[0]["E"])
    out = [full_params(model)]
    for k in range(len(ranks[0]["indices"])):
        idx = torch.tensor(sum((r["indices"][k] for r in ranks), []), dtype=torch.long)
        opt.zero_grad()
        loss_fn(kind, model, x[idx], y[idx]).backward()
        opt.step()
        out.append(full_params(model))
    return out


def private_model(kind, style, R, sigma=0.0, lr=1.0, momentum=0.0, width=None, E=1.0):
    """A sharded, privatized model with plain SGD through DPDistributed (its loader is not used)."""
    torch.manual_seed(0)
    model = block_mlp(width) if width else build(kind)
    shard(model)
    x, y = data(kind, 8)
    dp = fxdp.DPDistributed()
    loader = DataLoader(TensorDataset(x, y), batch_size=max(1, int(E)))  # q·N = E, the expected batch size
    model, opt, _ = dp.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr,
                                                                            momentum=momentum),
                                    data_loader=loader, noise_multiplier=sigma, max_grad_norm=R, style=style,
                                    sample_rate=E / 8)
    # these jobs feed fixed batches by hand (to compare with one process on the same global batch), not the
    # Poisson loader: the clipped = drawn step invariant is tested on its own in tests/privacy/test_loops_clipped_equals_drawn.py
    opt.batch_check = None
    return model, opt, dp


def neighbour_move(rank, world_size, *, style="all-layer", n=12):
    """Noise off, lr 1: ||update(D) - update(D minus example j)|| with FSDP2 on 2 ranks; j is the example
    of rank 1's shard with the largest gradient norm (so it is clipped)."""
    x, y = data("mlp", n, seed=3)
    model = build("mlp")
    R = median_R(model, x, y)
    norms = per_sample_norms(model, x, y)
    j = max(range(n // 2, n), key=lambda i: norms[i])
    shard_ = list(range(rank * n // 2, (rank + 1) * n // 2))

    def update(idx):
        m, opt, _ = private_model("mlp", style, R, E=n / 2)
        before = full_params(m)
        opt.zero_grad()
        F.cross_entropy(m(x[idx]), y[idx]).backward()
        opt.step()
        return before - full_params(m)

    with_j = update(shard_)
    without_j = update([i for i in shard_ if i != j])
    return {"move": float((with_j - without_j).norm()), "R": R, "E": n / 2, "norm_j": norms[j]}


def noise_in_updates(rank, world_size, *, steps=8, sigma=1.3, width=48):
    """Per step, this rank's released noise: p.grad (local shard) - (sum over ranks of the clipped sums) / E."""
    from fxdp.distributed.shards import owned_rows
    torch.manual_seed(7)  # every rank seeded alike: the noise streams must still be independent
    x, y = data("mlp", 16, seed=5 + rank)
    R, E = 0.3, 4.0
    model, opt, dp = private_model("mlp", "all-layer", R, sigma=sigma, lr=0.1, width=width, E=E)
    noises = []
    for k in range(steps):
        opt.zero_grad()
        idx = torch.arange(k % 3, 16, 3)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        clipped = []
        for p in model.parameters():  # the engine reduce-scattered the clipped sums into the shards
            start, stop, _ = owned_rows(p, rank, world_size)
            assert tuple(p.private_grad.to_local().shape) == (stop - start,) + tuple(p.shape[1:])
            clipped.append(p.private_grad.to_local().detach().clone().reshape(-1))
        opt.step()
        grads = torch.cat([p.grad.to_local().reshape(-1) for p in model.parameters()])
        noises.append(grads - torch.cat(clipped) / E)
    return {"noise": torch.stack(noises), "R": R, "E": E, "sigma": sigma}


def refusal(rank, world_size, *, case):
    """make_private on a sharded setup fxdp does not support; returns (error type, message)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor
    torch.manual_seed(0)
    model = build("mlp")
    if case == "hsdp":
        mesh = init_device_mesh("cpu", (1, world_size), mesh_dim_names=("replicate", "shard"))
        fully_shard(model, mesh=mesh)
    elif case == "tensor-parallel":
        mesh = init_device_mesh("cpu", (world_size,))
        model.inp.weight = nn.Parameter(distribute_tensor(model.inp.weight.detach(), mesh, [Shard(0)]))
    elif case == "cpu-offload":
        fully_shard(model, offload_policy=CPUOffloadPolicy(pin_memory=False))
    elif case == "compiled-block":
        model.blocks[0].compile(backend="eager")
        shard(model)
    elif case == "compiled-model":
        shard(model)
        model = torch.compile(model, backend="eager")
    elif case == "not-root":
        fully_shard(model.blocks[0])
    x, y = data("mlp", 8)
    dp = fxdp.DPDistributed()
    try:
        dp.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                        data_loader=DataLoader(TensorDataset(x, y), batch_size=2), noise_multiplier=1.0,
                        max_grad_norm=1.0)
    except Exception as exc:  # noqa: BLE001 - the test checks the type
        return type(exc).__name__, str(exc)
    return None, ""


def checkpoint_resume(rank, world_size, *, path, sigma=0.8, kind="mlp", steps_per_epoch=4):
    """Epoch 0, DCP checkpoint, epoch 1 (run A); then a fresh model, optimizer and DPDistributed load the
    checkpoint and run epoch 1 again (run B). Noise on. Returns both runs' parameters after epoch 1."""
    def setup(seed_shift):
        torch.manual_seed(100 + rank + seed_shift)  # run B starts from other RNG states: the load restores them
        x, y = data(kind, 16)
        model = shard(build(kind, seed=seed_shift))
        loader = DataLoader(TensorDataset(x, y), batch_size=4)
        dp = fxdp.DPDistributed()
        model, opt, loader = dp.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5,
                                                                                     momentum=0.9),
                                             data_loader=loader, noise_multiplier=sigma, max_grad_norm=0.5,
                                             sample_rate=0.25)
        return model, opt, loader, dp

    def epoch(model, opt, loader, e):
        loader.batch_sampler.set_epoch(e)
        for xb, yb in loader:
            opt.zero_grad()
            loss_fn(kind, model, xb, yb).backward()
            opt.step()

    model, opt, loader, dp = setup(0)
    epoch(model, opt, loader, 0)
    dp.save_checkpoint(path=path, module=model, optimizer=opt)
    epoch(model, opt, loader, 1)
    a, eps_a, steps_a = full_params(model), dp.get_epsilon(1e-5), opt.steps_taken
    model, opt, loader, dp = setup(1)
    dp.load_checkpoint(path=path, module=model, optimizer=opt)
    epoch(model, opt, loader, 1)
    return {"a": a, "b": full_params(model), "eps": (eps_a, dp.get_epsilon(1e-5)), "steps": (steps_a, opt.steps_taken),
            "files": sorted(os.listdir(path))}


def misuse(rank, world_size, *, case):
    """A sharded training loop used in a way fxdp refuses; returns (error type, message)."""
    x, y = data("mlp", 16)
    R = 0.5
    model, opt, dp = private_model("mlp", "all-layer", R, E=8.0)
    try:
        if case == "micro-batches":
            base = DataLoader(TensorDataset(x, y), batch_size=8)
            model2 = shard(build("mlp"))
            dp2 = fxdp.DPDistributed()
            model2, opt2, loader2 = dp2.make_private(module=model2, optimizer=torch.optim.SGD(model2.parameters(),
                                                                                              lr=0.1),
                                                     data_loader=base, noise_multiplier=1.0, max_grad_norm=R)
            with fxdp.BatchMemoryManager(data_loader=loader2, max_physical_batch_size=1, optimizer=opt2) as mb:
                for xb, yb in mb:
                    opt2.zero_grad()
                    F.cross_entropy(model2(xb), yb).backward()
                    opt2.step()
        elif case == "public-grad":
            opt.zero_grad()
            F.cross_entropy(model(x[:4]), y[:4]).backward()
            p = model.head.weight
            p.grad = torch.distributed.tensor.DTensor.from_local(torch.ones_like(p.to_local()), p.device_mesh,
                                                                 p.placements, run_check=False, shape=p.shape,
                                                                 stride=p.stride())
            opt.step()
    except Exception as exc:  # noqa: BLE001 - the test checks the type
        return type(exc).__name__, str(exc)
    return None, ""
