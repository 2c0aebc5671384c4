"""DP-SGD on scikit-learn's digits at a stated ε, against the same model trained without privacy.

    python examples/dp_digits.py [--epsilon 3] [--delta 1e-5] [--epochs 15] [--physical-batch-size 16]

The data set ships with scikit-learn (1797 8x8 images, 10 classes; 80% train,
20% test). Pixels are scaled by the public constant 1/16 -- statistics of the
training set would be a data-dependent step outside the privacy guarantee.
Training uses Opacus's conventions through fxdp: ``make_private_with_epsilon``
picks σ so that the run spends at most ``--epsilon`` at ``--delta`` (PRV
accountant, Poisson sampling), and the progress bar shows the loss and the ε
spent so far. ``--physical-batch-size`` processes each logical batch as
micro-batches (fxdp.BatchMemoryManager); the result is the same. ``--adaptive``
learns R during training (adaptive clipping, target: the median per-sample norm);
the progress bar then also shows the current R and the noised unclipped fraction.
Runs in well under a minute on a laptop CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fxdp  # noqa: E402


def load_digits_split(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    return TensorDataset(x_tr, y_tr), TensorDataset(x_te, y_te)


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset) -> float:
    model.eval()
    x, y = data.tensors
    acc = float((model(x).argmax(1) == y).float().mean())
    model.train()
    return acc


def train(model, optimizer, loader, epochs, desc, engine=None, delta=None, physical=None):
    steps = epochs * len(loader)
    bar = tqdm(total=steps, desc=desc, unit="step", leave=True)
    eps = 0.0
    for _ in range(epochs):
        manager = (fxdp.BatchMemoryManager(data_loader=loader, max_physical_batch_size=physical, optimizer=optimizer)
                   if physical else contextlib.nullcontext(loader))
        with manager as batches:
            for x, y in batches:
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                taken = getattr(optimizer, "steps_taken", None)
                optimizer.step()
                if taken is not None and optimizer.steps_taken == taken:
                    continue  # a micro-batch: the logical step happens at its last micro-batch
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", eps=f"{eps:.2f}" if engine else "n/a", **clip_progress(optimizer))
        if engine is not None:
            eps = engine.get_epsilon(delta)  # PRV accounting takes ~0.1 s: once per epoch
            bar.set_postfix(loss=f"{loss.item():.3f}", eps=f"{eps:.2f}", **clip_progress(optimizer))
    bar.close()
    return eps


def clip_progress(optimizer) -> dict:
    """Under adaptive clipping: the current R and the last step's noised unclipped fraction."""
    if getattr(optimizer, "adaptive_clipping", None) is None or not optimizer.last_release:
        return {}
    return {"R": f"{optimizer.max_grad_norm:.3f}", "unclipped": f"{optimizer.last_release['unclipped_fraction']:.2f}"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epsilon", type=float, default=3.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=64, help="expected logical batch size")
    ap.add_argument("--physical-batch-size", type=int, default=None)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=None, help="default 2.0 (0.5 with --adaptive)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--adaptive", action="store_true",
                    help="learn R as the median per-sample norm (adaptive clipping, starting at --max-grad-norm); "
                         "the update scales with R, so the learning rate needs retuning")
    args = ap.parse_args(argv)
    if args.lr is None:
        args.lr = 0.5 if args.adaptive else 2.0
    train_set, test_set = load_digits_split(args.seed)
    t0 = time.time()

    # non-private baseline: same model, optimizer and number of epochs
    torch.manual_seed(args.seed)
    model = make_model(args.seed)
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    train(model, opt, loader, args.epochs, "non-private")
    acc_plain = accuracy(model, test_set)

    # private run
    torch.manual_seed(args.seed)
    model = make_model(args.seed)
    loader = DataLoader(train_set, batch_size=args.batch_size)
    engine = fxdp.PrivacyEngine(accountant="prv")
    model, opt, loader = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=args.lr), data_loader=loader,
        target_epsilon=args.epsilon, target_delta=args.delta, epochs=args.epochs, max_grad_norm=args.max_grad_norm,
        **(dict(clipping="adaptive", target_unclipped_quantile=0.5, clipbound_learning_rate=0.2)
           if args.adaptive else {}))
    eps = train(model, opt, loader, args.epochs, f"DP (target ε={args.epsilon:g})", engine, args.delta,
                args.physical_batch_size)
    acc_dp = accuracy(model, test_set)

    print(f"\nnoise multiplier σ = {opt.noise_multiplier:.3f}, sample rate q = {loader.sample_rate:.4f}, "
          f"R = {args.max_grad_norm}" + (f" -> {opt.max_grad_norm:.3f} (adaptive)" if args.adaptive else "")
          + f", {args.epochs} epochs")
    print(f"test accuracy: non-private {acc_plain:.3f} | DP {acc_dp:.3f} at ε = {eps:.2f}, δ = {args.delta:g} "
          f"({time.time() - t0:.1f} s)")
    return {"acc_plain": acc_plain, "acc_dp": acc_dp, "epsilon": eps, "max_grad_norm": opt.max_grad_norm}


if __name__ == "__main__":
    torch.set_num_threads(1)  # a model this small gains nothing from threads (and loses a lot on a busy CPU)
    main()
