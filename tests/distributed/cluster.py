"""A small pool of worker processes joined in a gloo process group, for the distributed tests.

Starting processes that import torch costs seconds each, so one pool serves
every test of the session: ``Cluster.run("tests.distributed.jobs:name", **kwargs)``
runs ``name(rank=r, world_size=W, **kwargs)`` on every rank at once and returns
the per-rank :class:`Outcome`. Every call is bounded in time: a job that does not
finish within ``timeout`` seconds (a hang in a collective) shuts the pool down and
raises ``TimeoutError``. Only 127.0.0.1 and a free TCP port are used.
"""
from __future__ import annotations

import datetime
import importlib
import os
import queue
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, List, Optional

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_example_under_torchrun(script: str, *args: str, nproc: int = 2, timeout: float = 240):
    """``torchrun --nproc_per_node=nproc examples/<script> *args`` on 127.0.0.1 (CPU, gloo, one thread per
    process); asserts it exits 0 and returns its stdout."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, f"--nproc_per_node={nproc}", "--nnodes=1", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", os.path.join(ROOT, "examples", script), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@dataclass
class Outcome:
    """What one rank returned (``value``) or raised (``error_type``, ``message``, ``trace``)."""

    rank: int
    value: Any = None
    error_type: Optional[str] = None
    message: str = ""
    trace: str = ""

    @property
    def ok(self) -> bool:
        return self.error_type is None


def _serve(rank: int, world_size: int, port: int, inbox, outbox) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    import fxdp  # noqa: F401  (import once, before the first job)
    outbox.put((rank, "ready", None, ""))
    while True:
        job = inbox.get()
        if job is None:
            break
        target, kwargs = job
        module, name = target.split(":")
        try:
            value = getattr(importlib.import_module(module), name)(rank=rank, world_size=world_size, **kwargs)
            outbox.put((rank, "ok", value, ""))
        except BaseException as exc:  # report everything, keep serving
            outbox.put((rank, type(exc).__name__, str(exc), traceback.format_exc()))
    dist.destroy_process_group()


class Cluster:
    """``world_size`` gloo ranks on 127.0.0.1 serving jobs (module docstring)."""

    def __init__(self, world_size: int = 2, start_timeout: float = 120.0):
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.outbox = ctx.Queue()
        self.inboxes = [ctx.Queue() for _ in range(world_size)]
        port = free_port()
        self.procs = [ctx.Process(target=_serve, args=(r, world_size, port, self.inboxes[r], self.outbox),
                                  daemon=True) for r in range(world_size)]
        for p in self.procs:
            p.start()
        self._collect(start_timeout, "start")

    def _collect(self, timeout: float, what: str) -> List[Outcome]:
        deadline = time.monotonic() + timeout
        got = {}
        while len(got) < self.world_size:
            try:
                rank, status, value, trace = self.outbox.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
                if time.monotonic() < deadline and not dead:
                    continue
                self.close()
                raise TimeoutError(f"{what}: ranks {sorted(set(range(self.world_size)) - set(got))} did not "
                                   f"answer within {timeout:.0f} s (dead: {dead}); the cluster was shut down.")
            if status in ("ok", "ready"):
                got[rank] = Outcome(rank, value)
            else:
                got[rank] = Outcome(rank, None, status, value, trace)
        return [got[r] for r in range(self.world_size)]

    def run(self, target: str, timeout: float = 30.0, **kwargs) -> List[Outcome]:
        if not self.alive:
            raise RuntimeError("the cluster was shut down by an earlier failure")
        for inbox in self.inboxes:
            inbox.put((target, kwargs))
        return self._collect(timeout, target)

    def values(self, target: str, timeout: float = 30.0, **kwargs) -> List[Any]:
        """Like :meth:`run`, failing with the ranks' tracebacks if any rank raised."""
        outcomes = self.run(target, timeout, **kwargs)
        failed = [o for o in outcomes if not o.ok]
        if failed:
            raise AssertionError("\n".join(f"rank {o.rank}: {o.trace}" for o in failed))
        return [o.value for o in outcomes]

    @property
    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def close(self) -> None:
        for inbox in self.inboxes:
            try:
                inbox.put(None)
            except Exception:
                pass
        for p in self.procs:
            p.join(timeout=10)
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
