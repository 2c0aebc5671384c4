"""Utility of fxdp against Opacus 1.6: the same DP-SGD run on real data, side by side.

    python examples/utility.py [--seeds 3] [--epsilons 1 3 8] [--datasets digits breast_cancer] [--epochs 20]

For each data set (scikit-learn's bundled digits: 1797 8x8 images, 10 classes;
breast cancer: 569 x 30 features, 2 classes), each ε and each seed, the SAME
run is trained with fxdp and with Opacus: the same stratified 80/20 split, the
same initial weights (one MLP 64 hidden units, tanh), the same Poisson sampling
(q = 64 / N, Opacus's sampler with the same seed: identical batches), the same
σ (calibrated once with Opacus's PRV accountant for ε over the epochs, δ = 1e-5),
R = 1, SGD (lr 0.5 for mean-reduced losses), the same number of steps. Only the
noise draws differ. "non-private" is the same loop without clipping or noise.

Printed: test accuracy mean ± std over the seeds per library, ε after training
from fxdp's PLD accountant and from Opacus's PRV accountant (the same history),
and the wall time per run. The two libraries run the same algorithm, so their
accuracies must agree within the seed-to-seed noise.

Preprocessing: digits pixels are scaled by the public constant 1/16; breast-cancer
features are standardised with the training split's mean and std (identical for
both libraries; a real private pipeline would use public or DP statistics).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DELTA, R, BATCH, LR = 1e-5, 1.0, 64, 0.5


def load(name: str, seed: int):
    from sklearn.datasets import load_breast_cancer, load_digits
    from sklearn.model_selection import train_test_split

    x, y = (load_digits if name == "digits" else load_breast_cancer)(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    x_tr, x_te = torch.tensor(x_tr, dtype=torch.float32), torch.tensor(x_te, dtype=torch.float32)
    if name == "digits":
        x_tr, x_te = x_tr / 16.0, x_te / 16.0
    else:
        mu, sd = x_tr.mean(0), x_tr.std(0).clamp(min=1e-6)
        x_tr, x_te = (x_tr - mu) / sd, (x_te - mu) / sd
    return x_tr, torch.tensor(y_tr), x_te, torch.tensor(y_te)


def mlp(d_in: int, classes: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, 64), nn.Tanh(), nn.Linear(64, classes))


def loader(x, y, seed):
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, generator=torch.Generator().manual_seed(seed))


def train_loop(model, optimizer, data_loader, epochs):
    model.train()
    for _ in range(epochs):
        for xb, yb in data_loader:
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()


def accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def run_fxdp(model, data, sigma, epochs, seed):
    import fxdp

    x_tr, y_tr, x_te, y_te = data
    engine = fxdp.PrivacyEngine(accountant="pld")
    model, opt, dl = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                         data_loader=loader(x_tr, y_tr, seed), noise_multiplier=sigma, max_grad_norm=R)
    torch.manual_seed(seed + 1000)
    train_loop(model, opt, dl, epochs)
    return accuracy(model, x_te, y_te), engine.get_epsilon(DELTA), engine.accountant.history


def run_opacus(model, data, sigma, epochs, seed):
    from opacus import PrivacyEngine

    x_tr, y_tr, x_te, y_te = data
    engine = PrivacyEngine(accountant="prv")
    model, opt, dl = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                         data_loader=loader(x_tr, y_tr, seed), noise_multiplier=sigma,
                                         max_grad_norm=R, poisson_sampling=True)
    torch.manual_seed(seed + 1000)
    train_loop(model, opt, dl, epochs)
    return accuracy(model, x_te, y_te), engine.get_epsilon(DELTA), engine.accountant.history


def run_nonprivate(model, data, epochs, seed):
    from opacus.data_loader import DPDataLoader

    x_tr, y_tr, x_te, y_te = data
    dl = DPDataLoader.from_data_loader(loader(x_tr, y_tr, seed), generator=torch.Generator().manual_seed(seed))
    train_loop(model, torch.optim.SGD(model.parameters(), lr=LR), dl, epochs)
    return accuracy(model, x_te, y_te)


def fmt(values):
    return f"{statistics.mean(values):.3f} ± {statistics.pstdev(values):.3f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    p.add_argument("--datasets", nargs="+", default=["digits", "breast_cancer"])
    p.add_argument("--epochs", type=int, default=20)
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from opacus.accountants.utils import get_noise_multiplier
    from tabulate import tabulate

    rows = []
    for name in a.datasets:
        for eps in [None] + list(a.epsilons):
            acc = {"fxdp": [], "opacus": []}
            wall = {"fxdp": [], "opacus": []}
            eps_fx, eps_op, sigma = [], [], 0.0
            for seed in range(a.seeds):
                data = load(name, seed)
                init = mlp(data[0].shape[1], int(data[1].max()) + 1, seed)
                q = BATCH / len(data[0])
                if eps is None:
                    t = time.time()
                    acc["fxdp"].append(run_nonprivate(copy.deepcopy(init), data, a.epochs, seed))
                    wall["fxdp"].append(time.time() - t)
                    continue
                sigma = get_noise_multiplier(target_epsilon=eps, target_delta=DELTA, sample_rate=q,
                                             epochs=a.epochs, accountant="prv")
                for lib, fn in (("fxdp", run_fxdp), ("opacus", run_opacus)):
                    t = time.time()
                    accuracy_, spent, history = fn(copy.deepcopy(init), data, sigma, a.epochs, seed)
                    wall[lib].append(time.time() - t)
                    acc[lib].append(accuracy_)
                    (eps_fx if lib == "fxdp" else eps_op).append(spent)
            if eps is None:
                rows.append([name, "non-private", "-", fmt(acc["fxdp"]), "(same)", "-", "-",
                             f"{statistics.mean(wall['fxdp']):.2f}", "-"])
            else:
                rows.append([name, f"{eps:g}", f"{sigma:.3f}", fmt(acc["fxdp"]), fmt(acc["opacus"]),
                             f"{max(eps_fx):.3f}", f"{max(eps_op):.3f}", f"{statistics.mean(wall['fxdp']):.2f}",
                             f"{statistics.mean(wall['opacus']):.2f}"])
            print(f"done: {name} ε={eps if eps is not None else 'non-private'}", flush=True)
    print()
    print(f"{a.seeds} seeds, {a.epochs} epochs, Poisson q = {BATCH}/N, R = {R}, SGD lr {LR}, δ = {DELTA:g}")
    print(tabulate(rows, headers=["data", "target ε", "σ", "fxdp acc", "opacus acc", "ε fxdp (PLD)",
                                  "ε opacus (PRV)", "fxdp s/run", "opacus s/run"], tablefmt="github"))
    return rows


if __name__ == "__main__":
    main()
