"""examples/ddp_train.py under torchrun: 2 CPU processes (gloo) train a few steps and print ε."""
import re

from tests.distributed.cluster import run_example_under_torchrun


def test_ddp_example_runs_under_torchrun_on_two_cpu_processes_and_prints_epsilon(tmp_path):
    out = run_example_under_torchrun("ddp_train.py", "--epochs", "1", "--max-steps", "3",
                                     "--checkpoint", str(tmp_path / "ck.pt"), timeout=180)
    match = re.search(r"steps (\d+), ε = ([0-9.]+) .*identical on all 2 ranks: True", out)
    assert match, out
    assert int(match.group(1)) == 3 and float(match.group(2)) > 0
    assert (tmp_path / "ck.pt").exists()
