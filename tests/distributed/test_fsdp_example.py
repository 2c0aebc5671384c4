"""examples/fsdp_train.py under torchrun: 2 CPU processes (gloo) shard GPT-2, train a few DP steps, print ε
and write a DCP checkpoint."""
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.distributed.cluster import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_fsdp_example_runs_under_torchrun_on_two_cpu_processes(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node=2", "--nnodes=1", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(ROOT / "examples" / "fsdp_train.py"),
           "--max-steps", "3", "--num-sequences", "256", "--hidden-size", "32", "--style", "block-wise", "--checkpoint", str(tmp_path / "ck")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    match = re.search(r"steps (\d+), ε = ([0-9.]+) .*identical on all 2 ranks: True", proc.stdout)
    assert match, proc.stdout
    assert int(match.group(1)) == 3 and float(match.group(2)) > 0
    assert (tmp_path / "ck" / "fxdp_state.pt").exists()
