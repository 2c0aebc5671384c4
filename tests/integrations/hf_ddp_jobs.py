"""Jobs that every rank of a gloo cluster (tests/distributed/cluster.py) runs for test_hf_ddp.py.

Each job builds and trains a DPTrainer exactly as a ``torchrun`` script would (with the
environment variables torchrun sets; the process group already exists) and returns plain
data: trainable parameters, the indices the rank drew, ε, the accountant history.
"""
from __future__ import annotations

import os

import torch

from tests.integrations.hf_helpers import args, padded_texts, tiny_gpt2


class Recorded(torch.utils.data.Dataset):
    """A list of examples that records which indices were read."""

    def __init__(self, data):
        self.data, self.seen = data, []

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        self.seen.append(int(i))
        return self.data[i]


def _torchrun_env(rank: int, world_size: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT="29500",
                      OMP_NUM_THREADS="1")


def trainable(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def train(rank, world_size, *, out_dir, n=16, dtype=torch.float64, privacy=None, resume=None, perturb=None, **targs):
    """One DPTrainer run on this rank; ``perturb`` = {rank: privacy overrides} builds a different setup on one rank."""
    import transformers

    from fxdp.integrations import DPTrainer, PrivacyArguments

    transformers.utils.logging.set_verbosity_error()
    _torchrun_env(rank, world_size)
    privacy = dict(privacy or {})
    privacy.update((perturb or {}).get(rank, {}))
    data = Recorded(padded_texts(n))
    model = tiny_gpt2(dtype=dtype)
    trainer = DPTrainer(model=model, args=args(out_dir, **targs), train_dataset=data,
                        privacy_args=PrivacyArguments(**privacy))
    trainer.train(resume_from_checkpoint=resume)
    logs = [e for e in trainer.state.log_history if "loss" in e]
    return {"params": trainable(model), "seen": data.seen, "epsilon": trainer.get_epsilon(),
            "logged_epsilon": [e["epsilon"] for e in logs],
            "clipped_fraction": [e["clipped_fraction"] for e in logs if "clipped_fraction" in e],
            "history": list(trainer.budget.accountant.history),
            "sigma": trainer.budget.sigma, "sample_rate": trainer.budget.sample_rate,
            "expected_batch_size": trainer.dp_optimizer.expected_batch_size,
            "optimizer": type(trainer.dp_optimizer).__name__, "wrapped": type(trainer.model_wrapped).__name__,
            "world_size": trainer.args.world_size}


def noise_of_one_step(rank, world_size, *, out_dir, sigma, R, lr, **targs):
    """The update of one step with noise minus the same step without (same batches, same start):
    lr · noise / L, where the noise is what the released sum carries."""
    quiet = train(rank, world_size, out_dir=f"{out_dir}/quiet", privacy=dict(noise_multiplier=0.0, max_grad_norm=R),
                  max_steps=1, learning_rate=lr, **targs)
    noisy = train(rank, world_size, out_dir=f"{out_dir}/noisy", privacy=dict(noise_multiplier=sigma, max_grad_norm=R),
                  max_steps=1, learning_rate=lr, **targs)
    assert quiet["seen"] == noisy["seen"]
    start = trainable(tiny_gpt2(dtype=targs.get("dtype", torch.float64)))
    diff = torch.cat([(quiet["params"][k] - noisy["params"][k]).reshape(-1) for k in start])
    moved = torch.cat([(start[k] - noisy["params"][k]).reshape(-1) for k in start])
    return {"diff": diff, "moved": moved, "L": noisy["expected_batch_size"]}


def unlaunched(rank, world_size, *, out_dir):
    """DPTrainer in a process group of ``world_size`` ranks, without torchrun's environment variables."""
    from fxdp.integrations import DPTrainer, PrivacyArguments

    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        os.environ.pop(name, None)
    DPTrainer(model=tiny_gpt2(), args=args(out_dir), train_dataset=padded_texts(8),
              privacy_args=PrivacyArguments(noise_multiplier=1.0))


def ddp_wrapped(rank, world_size, *, out_dir):
    """A DPTrainer subclass that wraps the training model in DistributedDataParallel itself."""
    from fxdp.integrations import DPTrainer, PrivacyArguments

    class WrapsInDDP(DPTrainer):
        def _wrap_model(self, model, training=True, dataloader=None):
            return torch.nn.parallel.DistributedDataParallel(model) if training else model

    _torchrun_env(rank, world_size)
    trainer = WrapsInDDP(model=tiny_gpt2(), args=args(out_dir, max_steps=1), train_dataset=padded_texts(16),
                         privacy_args=PrivacyArguments(noise_multiplier=1.0))
    try:
        trainer.train()
    finally:
        assert len(trainer.budget.accountant) == 0  # nothing released nor charged
