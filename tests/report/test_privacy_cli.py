"""Privacy calculator: ``python -m fxdp privacy`` output parsed back, against the accountants themselves."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from fxdp.cli import main
from fxdp.report.privacy_calculator import privacy_calculator
from fxdp.training import accounting as A
from fxdp.training.pld import FINE_DISCRETIZATION, PLDAccountant

ROOT = Path(__file__).resolve().parents[2]


def _accountant(name):
    """The accountant the tables use: PLD on dp-accounting's fine grid (1e-4), the others as created."""
    return PLDAccountant(FINE_DISCRETIZATION) if name == "pld" else A.create_accountant(name)


def parse_table(text):
    """{accountant: (noise_multiplier, epsilon)} from the printed table (header line, rule, rows)."""
    lines = text.strip().splitlines()
    rule = next(i for i, line in enumerate(lines) if set(line.replace(" ", "")) == {"-"})
    assert lines[rule - 1].split()[:3] == ["accountant", "noise_multiplier", "epsilon"]
    out = {}
    for line in lines[rule + 1:]:
        parts = line.split()
        if not parts or parts[0] not in A.MECHANISMS:
            break
        out[parts[0]] = tuple(math.nan if v == "n/a" else float(v) for v in parts[1:3])
    return out


def _run(capsys, *argv):
    code = main(["privacy", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_python_dash_m_prints_the_reference_epsilons():
    """σ=1, q=0.01, 10⁴ steps, δ=1e-5: PLD 6.188, PRV 6.198, RDP 6.713, GDP 6.007 (an under-estimate)."""
    out = subprocess.run([sys.executable, "-m", "fxdp", "privacy", "--noise-multiplier", "1.0", "--sample-rate",
                          "0.01", "--steps", "10000", "--delta", "1e-5"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    rows = parse_table(out.stdout)
    assert list(rows) == ["pld", "prv", "rdp", "gdp"]
    eps = {k: v[1] for k, v in rows.items()}
    assert eps["pld"] == pytest.approx(6.188, abs=0.001) and eps["prv"] == pytest.approx(6.198, abs=0.001)
    assert eps["rdp"] == pytest.approx(6.713, abs=0.001) and eps["gdp"] == pytest.approx(6.007, abs=0.001)
    assert "UNDER-estimate" in out.stdout and all(v[0] == 1.0 for v in rows.values())


def test_target_epsilon_prints_sigmas_that_meet_the_target(capsys):
    code, out, _ = _run(capsys, "--target-epsilon", "3", "--epochs", "1", "--batch-size", "256",
                        "--dataset-size", "60000", "--accountants", "pld", "prv", "rdp")
    assert code == 0
    assert "q = 0.00426667, 235 steps" in out  # ceil(1 / (256/60000)) = 235
    rows = parse_table(out)
    q, steps = 256 / 60000, 235
    for name, (sigma, eps) in rows.items():
        acc = _accountant(name)
        acc.history = [(sigma, q, steps)]
        assert 3.0 - 0.02 <= A.epsilon_spent(acc, 1e-5) <= 3.0
        assert eps == pytest.approx(A.epsilon_spent(acc, 1e-5), abs=1e-4)
    assert rows["pld"][0] <= rows["prv"][0] <= rows["rdp"][0]


def test_json_output_and_function_agree_with_the_accountants(capsys):
    code, out, _ = _run(capsys, "--noise-multiplier", "2.0", "--sample-rate", "0.05", "--steps", "300", "--json",
                        "--accountants", "rdp", "pld")
    assert code == 0
    data = json.loads(out)
    assert data["mode"] == "epsilon" and data["steps"] == 300 and data["delta"] == 1e-5
    table = privacy_calculator(noise_multiplier=2.0, sample_rate=0.05, steps=300, delta=1e-5,
                               accountants=("rdp", "pld"))
    assert data["rows"] == table.to_dict()["rows"]
    for name in ("rdp", "pld"):
        acc = _accountant(name)
        acc.history = [(2.0, 0.05, 300)]
        assert table[name]["epsilon"] == A.epsilon_spent(acc, 1e-5)
    assert table["pld"]["epsilon"] < table["rdp"]["epsilon"]


def test_zero_noise_is_infinite_epsilon(capsys):
    code, out, _ = _run(capsys, "--noise-multiplier", "0", "--sample-rate", "0.1", "--steps", "10",
                        "--accountants", "pld", "rdp")
    assert code == 0 and all(math.isinf(v[1]) for v in parse_table(out).values())


def test_plot_writes_an_image_with_one_curve_per_accountant(tmp_path, capsys):
    path = tmp_path / "eps.png"
    code, out, _ = _run(capsys, "--noise-multiplier", "1.5", "--sample-rate", "0.02", "--steps", "200",
                        "--accountants", "pld", "rdp", "--plot", str(path))
    assert code == 0 and "plot written" in out
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from fxdp.report.privacy_calculator import epsilon_curve

    curve = epsilon_curve(noise_multiplier=1.5, sample_rate=0.02, steps=200, delta=1e-5, accountants=("pld", "rdp"),
                          points=5)
    assert curve["steps"] == [40, 80, 120, 160, 200]
    assert all(a < b for a, b in zip(curve["pld"], curve["pld"][1:]))  # ε grows with the steps
    assert all(p < r for p, r in zip(curve["pld"], curve["rdp"]))


@pytest.mark.parametrize("argv, match", [
    (["--noise-multiplier", "1", "--sample-rate", "0.1", "--batch-size", "8", "--dataset-size", "80", "--steps", "5"],
     "not both"),
    (["--noise-multiplier", "1", "--sample-rate", "0.1"], "exactly one of steps and epochs"),
    (["--noise-multiplier", "1", "--batch-size", "8", "--steps", "5"], "dataset_size"),
    (["--noise-multiplier", "1", "--sample-rate", "1.5", "--steps", "5"], "sample_rate"),
    (["--noise-multiplier", "1", "--sample-rate", "0.1", "--steps", "5", "--delta", "1"], "delta"),
    (["--noise-multiplier", "1", "--sample-rate", "0.1", "--steps", "5", "--accountants", "moments"],
     "unknown accountant"),
])
def test_bad_arguments_exit_2_with_a_message(capsys, argv, match):
    code, out, err = _run(capsys, *argv)
    assert code == 2 and match in err and out == ""


def test_sigma_and_target_are_mutually_exclusive(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["privacy", "--noise-multiplier", "1", "--target-epsilon", "3", "--sample-rate", "0.1", "--steps", "5"])
    assert exc.value.code == 2
