"""What the benchmarks share: timing against a baseline, machine facts, and printing tables.

    speed_ratio(fn, baseline, repeats)   median and p10–p90 of fn time / baseline time, interleaved pairs
    machine_info()                        backend, device, JAX and Python versions, git revision, date
    print_tables(tables, line, markdown)  rich tables on the terminal, and markdown for RESULTS.md
"""

from __future__ import annotations

import datetime
import platform
import statistics
import time
from pathlib import Path

import jax
import numpy as np
from rich.console import Console
from rich.table import Table


# --- timing --------------------------------------------------------------------------------------

def speed_ratio(fn, baseline, repeats: int) -> dict:
    """Median and p10–p90 of fn time / baseline time over interleaved pairs (each call blocked on)."""
    for f in (fn, baseline):
        jax.block_until_ready(f())
    ratios, times = [], []
    for i in range(repeats):
        pair = []
        for f in ((fn, baseline) if i % 2 == 0 else (baseline, fn)):
            start = time.perf_counter()
            jax.block_until_ready(f())
            pair.append(time.perf_counter() - start)
        mine, base = pair if i % 2 == 0 else pair[::-1]
        ratios.append(mine / base)
        times.append((mine, base))
    q = statistics.quantiles(ratios, n=10)
    return {"ratio": statistics.median(ratios), "p10": q[0], "p90": q[-1],
            "ms": statistics.median(t[0] for t in times) * 1e3, "baseline_ms": statistics.median(t[1] for t in times) * 1e3}


def nbytes(tree) -> int:
    return int(sum(np.size(x) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def machine_info() -> dict:
    import subprocess

    try:
        revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                  cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        revision = ""
    device = jax.devices()[0]
    return {"backend": jax.default_backend(), "device": getattr(device, "device_kind", str(device)),
            "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
            "jax": jax.__version__, "git": revision, "date": datetime.date.today().isoformat()}


def ratio_text(s) -> str:
    """'median (p10–p90)' of a speed_ratio result."""
    return f"{s['ratio']:.2f} ({s['p10']:.2f}–{s['p90']:.2f})"


def print_tables(tables, line: str, markdown: bool) -> None:
    """Each (title, head, rows) as a rich table, then `line`; with `markdown`, again as markdown."""
    console = Console(width=200)
    for title, head, rows in tables:
        table = Table(*head, title=title, title_justify="left")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    console.print(line)
    if markdown:
        print()
        for title, head, rows in tables:
            print(f"**{title}**\n")
            print("| " + " | ".join(head) + " |")
            print("|" + "---|" * len(head))
            for row in rows:
                print("| " + " | ".join(row) + " |")
            print()
        print(line)
