import pytest

from graphopt.errors import TargetError
from graphopt.lowering import target as target_module
from graphopt.lowering.target import Target, devices, parse_target


@pytest.mark.parametrize("text, expected", [
    ("cpu", Target("cpu")), ("CUDA", Target("cuda")), ("tpu", Target("tpu")),
    ("tpu:v5e:2x2", Target("tpu", "v5e:2x2")), ("tpu:v4:2x2x1", Target("tpu", "v4:2x2x1")),
])
def test_targets_parse(text, expected):
    assert parse_target(text) == expected
    assert str(parse_target(text)) == text.lower()


@pytest.mark.parametrize("text, says", [
    ("gpu", "unknown target 'gpu'"), ("tpu:v5e", "bad TPU topology 'v5e'"),
    ("tpu:v5e:2y2", "bad TPU topology"), ("metal", "use cpu, cuda, tpu"),
])
def test_bad_targets_say_what_to_write(text, says):
    with pytest.raises(TargetError, match=says):
        parse_target(text)


def test_cuda_without_a_gpu_points_to_export():
    with pytest.raises(TargetError, match=r"no cuda device on this machine; export for CUDA instead"):
        devices(Target("cuda"))


def test_tpu_topology_without_libtpu_names_the_install_command(monkeypatch):
    monkeypatch.setattr(target_module, "libtpu_available", lambda: False)
    monkeypatch.setattr(target_module, "_topologies", {})
    with pytest.raises(TargetError, match=r"needs libtpu.*pip install 'graphopt\[tpu\]'"):
        devices(Target("tpu", "v5e:2x2"))


@pytest.mark.skipif(not target_module.libtpu_available(), reason="libtpu is not installed "
                    "(pip install 'graphopt[tpu]'): TPU topologies cannot be built")
def test_unknown_tpu_chip_is_reported_by_name():
    with pytest.raises(TargetError, match=r"cannot build the TPU topology 'v9:2x2'.*Known chips"):
        devices(Target("tpu", "v9:2x2"))
