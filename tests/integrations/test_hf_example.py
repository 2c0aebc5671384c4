"""examples/hf_trainer_lora.py runs a few DPTrainer steps (tiny GPT-2 + LoRA from config) and prints ε."""
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[2]


def test_hf_trainer_lora_example_runs_a_few_steps_and_prints_epsilon(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("hf_trainer_lora", ROOT / "examples" / "hf_trainer_lora.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--max-steps", "3", "--examples", "100", "--test-examples", "16", "--epsilon", "4", "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert result["steps"] == 3 and 0 < result["epsilon"] <= 4.0
    assert f"ε = {result['epsilon']:.3f} at δ = 1e-05 (target 4)" in out
