from rich.console import Console

from graphopt.progress import track


def test_disabled_or_not_a_terminal_passes_the_items_through():
    items = [1, 2, 3]
    assert track(items, "x", enabled=False) is items
    assert track(items, "x") is items  # pytest captures the output: not a terminal


def test_on_a_terminal_a_bar_is_drawn_on_stderr(monkeypatch, capsys):
    monkeypatch.setattr(Console, "is_terminal", property(lambda self: True))
    assert list(track(iter(range(4)), "counting", total=4)) == [0, 1, 2, 3]
    out, err = capsys.readouterr()
    assert out == "" and "counting" in err
