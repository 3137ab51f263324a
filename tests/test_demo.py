from rich.console import Console

from graphopt.cli import main
from graphopt.demo import DemoConfig, run_demo


def test_demo_reports_exact_round_trip():
    console = Console(record=True, width=120)
    result = run_demo(DemoConfig(layers=1, seq=16), console=console)
    assert result["max_error"] == 0.0
    assert result["speedup"] > 0 and result["nodes"] > 50
    text = console.export_text()
    assert "max |error| vs original" in text and "speed vs jax.jit" in text and "dot_general" in text


def test_cli_demo_and_bad_pipeline(capsys):
    assert main(["demo", "--layers", "1", "--seq", "8"]) == 0
    assert main(["demo", "--layers", "1", "--seq", "8", "--pipeline", "nope"]) == 1
    assert "unknown pipeline 'nope'" in capsys.readouterr().err
