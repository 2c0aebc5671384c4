"""examples/ddp_train.py under torchrun: 2 CPU processes (gloo) train a few steps and print ε."""
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.distributed.cluster import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_ddp_example_runs_under_torchrun_on_two_cpu_processes_and_prints_epsilon(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node=2", "--nnodes=1", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(ROOT / "examples" / "ddp_train.py"),
           "--epochs", "1", "--max-steps", "3", "--checkpoint", str(tmp_path / "ck.pt")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    match = re.search(r"steps (\d+), ε = ([0-9.]+) .*identical on all 2 ranks: True", proc.stdout)
    assert match, proc.stdout
    assert int(match.group(1)) == 3 and float(match.group(2)) > 0
    assert (tmp_path / "ck.pt").exists()
