"""Privacy calculator: what ε a DP-SGD run costs, or what σ it needs, per accountant.

Every figure is for ``steps`` Poisson-subsampled Gaussian steps at sampling rate
``q`` (the accounting of :class:`fxdp.PrivacyEngine` with Poisson sampling), at
δ. The accountants (:mod:`fxdp.training.accounting`):

- ``pld``: privacy loss distributions (Google's dp-accounting), the tightest upper bound;
- ``prv``: Opacus's privacy loss random variables, a tight upper bound;
- ``rdp``: Rényi DP, a looser upper bound;
- ``gdp``: the central-limit (Gaussian DP) approximation -- NOT an upper bound, it can
  under-estimate ε (marked in the tables; never calibrate a real run with it).

The sampling rate is given as ``sample_rate`` or as ``batch_size / dataset_size``
(expected batch size over the data set size); the length as ``steps`` or as
``epochs`` (``ceil(epochs / q)`` steps, as :func:`~fxdp.training.accounting.steps_for_epochs`).

Use :func:`privacy_calculator` from a notebook, or ``python -m fxdp privacy`` (see
:mod:`fxdp.cli`).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from fxdp.training.accounting import MECHANISMS, create_accountant, epsilon_spent, get_noise_multiplier, steps_for_epochs
from fxdp.training.pld import FINE_DISCRETIZATION, PLDAccountant, epsilon_of_history

DEFAULT_ACCOUNTANTS = ("pld", "prv", "rdp", "gdp")
CURVE_PLD_GRID = 1e-3
NOTES = {"pld": "tightest upper bound", "prv": "upper bound", "rdp": "looser upper bound",
         "gdp": "CLT approximation: can UNDER-estimate"}


@dataclass
class PrivacyTable:
    """The calculator's answer: ``rows`` holds one dict per accountant (``accountant``,
    ``noise_multiplier``, ``epsilon``, ``note``); ``str()`` is the printed table and
    :meth:`to_dict` the JSON form."""

    mode: str  # "epsilon" (ε for a given σ) or "noise" (σ for a target ε)
    sample_rate: float
    steps: int
    delta: float
    target_epsilon: Optional[float] = None
    rows: List[Dict] = field(default_factory=list)

    def __getitem__(self, accountant: str) -> Dict:
        for row in self.rows:
            if row["accountant"] == accountant:
                return row
        raise KeyError(accountant)

    def to_dict(self) -> dict:
        """JSON-ready: NaN (a failed calibration) becomes None, ∞ becomes the string "inf"."""
        def clean(v):
            if isinstance(v, float) and math.isnan(v):
                return None
            return "inf" if isinstance(v, float) and math.isinf(v) else v
        return {"mode": self.mode, "sample_rate": self.sample_rate, "steps": self.steps, "delta": self.delta,
                "target_epsilon": self.target_epsilon,
                "rows": [{k: clean(v) for k, v in r.items()} for r in self.rows]}

    def __str__(self) -> str:
        from tabulate import tabulate

        head = f"Poisson sampling q = {self.sample_rate:.6g}, {self.steps} steps, δ = {self.delta:g}"
        if self.mode == "noise":
            head = f"noise multiplier for ε <= {self.target_epsilon:g}: " + head
        body = [[r["accountant"], "n/a" if math.isnan(r["noise_multiplier"]) else f"{r['noise_multiplier']:.6g}",
                 _fmt(r["epsilon"]), r["note"]] for r in self.rows]
        return head + "\n" + tabulate(body, headers=["accountant", "noise_multiplier", "epsilon", "note"],
                                      tablefmt="simple", disable_numparse=True)


def _fmt(eps: float) -> str:
    return "inf" if math.isinf(eps) else ("n/a" if math.isnan(eps) else f"{eps:.4f}")


def resolve_sampling(*, sample_rate=None, batch_size=None, dataset_size=None, steps=None, epochs=None):
    """(q, steps) from either ``sample_rate`` or ``batch_size``/``dataset_size``, and either
    ``steps`` or ``epochs``; ValueError on a missing, duplicated or out-of-range argument."""
    if sample_rate is not None and (batch_size is not None or dataset_size is not None):
        raise ValueError("fxdp: give the sampling rate as sample_rate OR as batch_size and dataset_size, not both.")
    if sample_rate is None:
        if batch_size is None or dataset_size is None:
            raise ValueError("fxdp: give sample_rate, or both batch_size (expected batch size) and dataset_size.")
        if not (0 < batch_size <= dataset_size):
            raise ValueError(f"fxdp: need 0 < batch_size <= dataset_size, got {batch_size} and {dataset_size}.")
        sample_rate = batch_size / dataset_size
    q = float(sample_rate)
    if not (0 < q <= 1):
        raise ValueError(f"fxdp: sample_rate must be in (0, 1], got {sample_rate!r}.")
    if (steps is None) == (epochs is None):
        raise ValueError("fxdp: give exactly one of steps and epochs.")
    if steps is None:
        if not float(epochs) > 0:
            raise ValueError(f"fxdp: epochs must be > 0, got {epochs!r}.")
        steps = steps_for_epochs(float(epochs), q)
    if isinstance(steps, bool) or int(steps) != steps or int(steps) <= 0:
        raise ValueError(f"fxdp: steps must be a positive integer, got {steps!r}.")
    return q, int(steps)


def _accountants(names: Sequence[str]) -> List[str]:
    out = []
    for name in names:
        key = str(name).strip().lower()
        if key not in MECHANISMS:
            raise ValueError(f"fxdp: unknown accountant {name!r}; expected some of {', '.join(MECHANISMS)}.")
        if key not in out:
            out.append(key)
    if not out:
        raise ValueError("fxdp: no accountant given.")
    return out


def _epsilon(mechanism: str, sigma: float, q: float, steps: int, delta: float) -> float:
    """ε of one accountant; the PLD tables use dp-accounting's fine grid (1e-4) for the last digit."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="GDP accounting is experimental")
        warnings.filterwarnings("ignore", message="Optimal order is the")
        accountant = PLDAccountant(FINE_DISCRETIZATION) if mechanism == "pld" else create_accountant(mechanism)
    accountant.history = [(float(sigma), q, steps)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        return epsilon_spent(accountant, delta)


def epsilon_table(*, noise_multiplier: float, delta: float, accountants: Sequence[str] = DEFAULT_ACCOUNTANTS,
                  **sampling) -> PrivacyTable:
    """ε at ``delta`` per accountant after the run described by ``sampling`` (see
    :func:`resolve_sampling`) at ``noise_multiplier`` σ (σ = 0 gives ε = inf)."""
    if not float(noise_multiplier) >= 0:
        raise ValueError(f"fxdp: noise_multiplier must be >= 0, got {noise_multiplier!r}.")
    _check_delta(delta)
    q, steps = resolve_sampling(**sampling)
    table = PrivacyTable("epsilon", q, steps, float(delta))
    for name in _accountants(accountants):
        table.rows.append({"accountant": name, "noise_multiplier": float(noise_multiplier),
                           "epsilon": _epsilon(name, noise_multiplier, q, steps, delta), "note": NOTES[name]})
    return table


def noise_table(*, target_epsilon: float, delta: float, accountants: Sequence[str] = DEFAULT_ACCOUNTANTS,
                epsilon_tolerance: float = 0.01, **sampling) -> PrivacyTable:
    """The σ each accountant needs so that the run (``sampling``, see :func:`resolve_sampling`)
    spends at most ``target_epsilon`` at ``delta``, with the ε it then reports."""
    _check_delta(delta)
    q, steps = resolve_sampling(**sampling)
    table = PrivacyTable("noise", q, steps, float(delta), target_epsilon=float(target_epsilon))
    for name in _accountants(accountants):
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="GDP accounting is experimental")
                sigma = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=q,
                                             steps=steps, accountant=name, epsilon_tolerance=epsilon_tolerance)
        except (ValueError, ArithmeticError) as exc:
            if name != "gdp":
                raise
            # Opacus's GDP root search fails at large σ (scipy brentq sign error): report, do not guess
            table.rows.append({"accountant": name, "noise_multiplier": math.nan, "epsilon": math.nan,
                               "note": f"calibration failed in opacus ({exc})"})
            continue
        table.rows.append({"accountant": name, "noise_multiplier": sigma,
                           "epsilon": _epsilon(name, sigma, q, steps, delta), "note": NOTES[name]})
    return table


def epsilon_curve(*, noise_multiplier: float, delta: float, accountants: Sequence[str] = DEFAULT_ACCOUNTANTS,
                  points: int = 20, **sampling) -> Dict[str, List]:
    """{"steps": [...], accountant: [ε after that many steps, ...]} at ``points`` evenly spaced
    step counts up to the run's length. The PLD curve uses the accountant's default grid (1e-3),
    10x coarser than the tables': still a pessimistic upper bound, within ~0.1% of the table's figure."""
    _check_delta(delta)
    q, steps = resolve_sampling(**sampling)
    grid = sorted({max(1, round(steps * (i + 1) / points)) for i in range(int(points))})
    curve: Dict[str, List] = {"steps": grid}
    for name in _accountants(accountants):
        if name == "pld" and noise_multiplier > 0:
            curve[name] = [epsilon_of_history([(noise_multiplier, q, k)], delta, CURVE_PLD_GRID) for k in grid]
        else:
            curve[name] = [_epsilon(name, noise_multiplier, q, k, delta) for k in grid]
    return curve


def plot_epsilon(path, *, noise_multiplier: float, delta: float, accountants: Sequence[str] = DEFAULT_ACCOUNTANTS,
                 points: int = 20, **sampling) -> Dict[str, List]:
    """Draw ε against steps for each accountant into ``path`` (PNG, PDF, SVG: by extension);
    needs matplotlib (``pip install 'fxdp[plot]'``). Returns the curve that was drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("fxdp: plotting needs matplotlib: pip install 'fxdp[plot]' (or matplotlib)") from exc
    curve = epsilon_curve(noise_multiplier=noise_multiplier, delta=delta, accountants=accountants, points=points,
                          **sampling)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in curve:
        if name != "steps":
            ax.plot(curve["steps"], curve[name], label=f"{name} ({NOTES[name]})",
                    linestyle="--" if name == "gdp" else "-")
    q, _ = resolve_sampling(**sampling)
    ax.set_xlabel("steps")
    ax.set_ylabel(f"ε at δ = {delta:g}")
    ax.set_title(f"σ = {noise_multiplier:g}, q = {q:.4g}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return curve


def privacy_calculator(*, delta: float, noise_multiplier: Optional[float] = None,
                       target_epsilon: Optional[float] = None, accountants: Sequence[str] = DEFAULT_ACCOUNTANTS,
                       plot: Optional[str] = None, **sampling) -> PrivacyTable:
    """The notebook entry point: ε per accountant for a given ``noise_multiplier``, or σ per
    accountant for a ``target_epsilon`` (exactly one of them). ``sampling``: ``sample_rate``
    or ``batch_size`` + ``dataset_size``, and ``steps`` or ``epochs``. ``plot="eps.png"``
    also draws ε against steps (at the given σ, or at the σ the first accountant needs).

    Example::

        >>> print(privacy_calculator(noise_multiplier=1.0, sample_rate=0.01, steps=10_000, delta=1e-5))
    """
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError("fxdp: give exactly one of noise_multiplier (to get ε) and target_epsilon (to get σ).")
    if noise_multiplier is not None:
        table = epsilon_table(noise_multiplier=noise_multiplier, delta=delta, accountants=accountants, **sampling)
    else:
        table = noise_table(target_epsilon=target_epsilon, delta=delta, accountants=accountants, **sampling)
    if plot is not None:
        sigma = next(r["noise_multiplier"] for r in table.rows if not math.isnan(r["noise_multiplier"]))
        plot_epsilon(plot, noise_multiplier=sigma, delta=delta,
                     accountants=accountants, sample_rate=table.sample_rate, steps=table.steps)
    return table


def _check_delta(delta):
    if not (0 < float(delta) < 1):
        raise ValueError(f"fxdp: delta must be in (0, 1), got {delta!r}.")


__all__ = ["PrivacyTable", "epsilon_curve", "epsilon_table", "noise_table", "plot_epsilon", "privacy_calculator",
           "resolve_sampling"]
