"""Command line: ``python -m fxdp explain MODULE:FACTORY [options]`` and
``python -m fxdp privacy [options]`` (the privacy calculator, :mod:`fxdp.report.privacy_calculator`).

``MODULE`` is a dotted module name (importable from the current directory) or
a path to a ``.py`` file; ``FACTORY`` a function in it returning
``(model, example_args)`` or ``(model, example_args, example_kwargs)``. With
``--batch N`` the factory is called as ``FACTORY(batch_size=N)`` (it must take
that keyword). The report is printed as a table (default) or as JSON
(``--json``); ``--dot FILE`` writes the layer / block graph as Graphviz DOT;
``--cost B=64,T=1024`` also prints the cost table at other shapes.

Exit status: 0 when privatize would accept the model, 1 when the report lists
problems, 2 for usage errors (bad MODULE:FACTORY, bad factory result).

``privacy``: ``--noise-multiplier S`` prints ε per accountant, ``--target-epsilon E``
the σ each accountant needs; the sampling rate is ``--sample-rate`` or
``--batch-size`` with ``--dataset-size``, the length ``--steps`` or ``--epochs``;
``--delta`` (default 1e-5), ``--accountants pld prv rdp gdp``, ``--json``,
``--plot FILE`` (ε against steps, needs matplotlib). Exit status 0, or 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import os
import sys
from typing import List, Optional


class UsageError(Exception):
    pass


def load_factory(spec: str):
    """``"pkg.mod:fn"`` or ``"path/to/file.py:fn"`` -> the function."""
    if ":" not in spec:
        raise UsageError(f"expected MODULE:FACTORY, got {spec!r}")
    module_name, _, attr = spec.rpartition(":")
    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        path = os.path.abspath(module_name)
        if not os.path.isfile(path):
            raise UsageError(f"no such file: {module_name}")
        name = "fxdp_cli_" + os.path.splitext(os.path.basename(path))[0]
        loader_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        loader_spec.loader.exec_module(module)
    else:
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            raise UsageError(f"cannot import {module_name!r}: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UsageError(f"{module_name} has no function {attr!r}")
    return factory


def build(factory, batch: Optional[int]):
    """Call the factory and split its result into (model, args, kwargs)."""
    if batch is not None:
        params = inspect.signature(factory).parameters
        if "batch_size" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            raise UsageError(f"--batch given, but {factory.__name__}() takes no batch_size argument")
        result = factory(batch_size=batch)
    else:
        result = factory()
    if not isinstance(result, tuple) or len(result) not in (2, 3):
        raise UsageError(f"{factory.__name__}() must return (model, example_args[, example_kwargs]), "
                         f"got {type(result).__name__}")
    model, args = result[0], result[1]
    kwargs = result[2] if len(result) == 3 else {}
    if not isinstance(args, (tuple, list)):
        args = (args,)
    if not isinstance(kwargs, dict):
        raise UsageError(f"{factory.__name__}(): example_kwargs must be a dict, got {type(kwargs).__name__}")
    return model, tuple(args), dict(kwargs)


def parse_shape(text: str) -> dict:
    """``"B=64,T=1024"`` -> {"B": 64, "T": 1024}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = part.partition("=")
        if not eq or key.strip() not in ("B", "T"):
            raise UsageError(f"--cost expects B=..,T=.., got {text!r}")
        try:
            out[key.strip()] = int(value)
        except ValueError:
            raise UsageError(f"--cost: {key.strip()} must be an integer, got {value!r}") from None
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fxdp", description="fxdp: differentially private training tools")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("explain", help="analyse a model: per-layer rules, clip groups, costs, problems")
    e.add_argument("target", help="MODULE:FACTORY (dotted module or path/to/file.py)")
    e.add_argument("--style", default="all-layer", help="all-layer, layer-wise, param-wise or block-wise")
    e.add_argument("--batch", type=int, default=None, help="example batch size (passed as batch_size=N)")
    e.add_argument("--max-grad-norm", type=float, default=1.0, help="R")
    e.add_argument("--clipping-fn", default="abadi", help="abadi, automatic or global")
    e.add_argument("--loss-reduction", default="mean", help="mean or sum")
    e.add_argument("--block-heads", nargs="+", default=None, help="module names starting blocks (block-wise)")
    e.add_argument("--json", action="store_true", help="print the report as JSON")
    e.add_argument("--dot", metavar="FILE", default=None, help="write the layer / block graph as Graphviz DOT")
    e.add_argument("--cost", metavar="B=..,T=..", default=None, help="also print the costs at these shapes")
    add_privacy_parser(sub)
    return p


def add_privacy_parser(sub) -> None:
    r = sub.add_parser("privacy", help="privacy calculator: ε per accountant for a σ, or σ for a target ε")
    what = r.add_mutually_exclusive_group(required=True)
    what.add_argument("--noise-multiplier", type=float, help="σ: print the ε it costs per accountant")
    what.add_argument("--target-epsilon", type=float, help="print the σ each accountant needs for this ε")
    r.add_argument("--sample-rate", type=float, default=None, help="Poisson sampling rate q")
    r.add_argument("--batch-size", type=int, default=None, help="expected batch size (with --dataset-size)")
    r.add_argument("--dataset-size", type=int, default=None, help="number of examples (with --batch-size)")
    r.add_argument("--steps", type=int, default=None, help="number of optimizer steps")
    r.add_argument("--epochs", type=float, default=None, help="epochs (steps = ceil(epochs / q))")
    r.add_argument("--delta", type=float, default=1e-5, help="δ (default 1e-5; keep it well below 1/dataset size)")
    r.add_argument("--accountants", nargs="+", default=["pld", "prv", "rdp", "gdp"], help="accountants to use")
    r.add_argument("--plot", metavar="FILE", default=None, help="draw ε against steps per accountant (matplotlib)")
    r.add_argument("--json", action="store_true", help="print the table as JSON")


def privacy_main(args) -> int:
    from fxdp.report.privacy_calculator import privacy_calculator

    sampling = {k: getattr(args, k) for k in ("sample_rate", "batch_size", "dataset_size", "steps", "epochs")
                if getattr(args, k) is not None}
    try:
        table = privacy_calculator(delta=args.delta, noise_multiplier=args.noise_multiplier,
                                   target_epsilon=args.target_epsilon, accountants=args.accountants,
                                   plot=args.plot, **sampling)
    except (ValueError, ImportError) as exc:
        print(f"fxdp privacy: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(table.to_dict(), indent=1) if args.json else table)
    if args.plot and not args.json:
        print(f"plot written to {args.plot}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "privacy":
        return privacy_main(args)
    from fxdp.report import explain

    try:
        factory = load_factory(args.target)
        model, ex_args, ex_kwargs = build(factory, args.batch)
        shape = parse_shape(args.cost) if args.cost else None
        report = explain(model, *ex_args, style=args.style, max_grad_norm=args.max_grad_norm,
                         clipping_fn=args.clipping_fn, loss_reduction=args.loss_reduction,
                         block_heads=args.block_heads, **ex_kwargs)
    except (UsageError, ValueError) as exc:
        print(f"fxdp explain: {exc}", file=sys.stderr)
        return 2
    if args.dot:
        report.write_dot(args.dot)
    if args.json:
        data = report.to_dict()
        if shape is not None:
            data["cost_at"] = report.cost(**shape).to_dict()
        print(json.dumps(data, indent=1))
    else:
        print(report)
        if shape is not None:
            print()
            print(report.cost(**shape))
    return 0 if report.ok else 1
