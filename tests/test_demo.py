from rich.console import Console

from graphopt.cli import main
from graphopt.demo import DemoConfig, run_demo


def test_demo_reports_error_speed_and_raised_ops():
    console = Console(record=True, width=120)
    result = run_demo(DemoConfig(layers=1, seq=16), console=console)
    # fuse_attention may run attention on jax.nn.dot_product_attention: rounding-level differences
    assert result["max_error"] < 1e-4
    assert result["speedup"] > 0 and result["nodes"] > 50
    text = console.export_text()
    assert "max |error| vs original" in text and "speed vs jax.jit" in text
    assert "attention" in text and "layer_norm" in text and "raise_ops" in text


def test_demo_cleanup_pipeline_is_exact():
    result = run_demo(DemoConfig(layers=1, seq=16), pipeline="cleanup", console=Console(record=True, width=120))
    assert result["max_error"] == 0.0


def test_cli_demo_and_bad_pipeline(capsys):
    assert main(["demo", "--layers", "1", "--seq", "8"]) == 0
    assert main(["demo", "--layers", "1", "--seq", "8", "--pipeline", "nope"]) == 1
    assert "unknown pipeline 'nope'" in capsys.readouterr().err
