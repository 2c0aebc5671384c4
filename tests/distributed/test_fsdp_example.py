"""examples/fsdp_train.py under torchrun: 2 CPU processes (gloo) shard GPT-2, train a few DP steps, print ε
and write a DCP checkpoint."""
import re

from tests.distributed.cluster import run_example_under_torchrun


def test_fsdp_example_runs_under_torchrun_on_two_cpu_processes(tmp_path):
    out = run_example_under_torchrun("fsdp_train.py", "--max-steps", "3", "--num-sequences", "256",
                                     "--hidden-size", "32", "--style", "block-wise", "--checkpoint", str(tmp_path / "ck"))
    match = re.search(r"steps (\d+), ε = ([0-9.]+) .*identical on all 2 ranks: True", out)
    assert match, out
    assert int(match.group(1)) == 3 and float(match.group(2)) > 0
    assert (tmp_path / "ck" / "fxdp_state.pt").exists()
