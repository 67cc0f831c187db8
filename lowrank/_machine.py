"""What machine a benchmark ran on, for its report, and where a run writes its results."""

from __future__ import annotations

import platform
from pathlib import Path

RESULTS_IN_CHECKOUT = Path("benchmarks") / "results"


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def default_results_dir(group: str) -> Path:
    """Where the experiment drivers write by default: ./benchmarks/results/<group> ("da" for
    lowrank.da.bench and lowrank.da.select, "finetune" for lowrank.finetune.bench) when run from a
    lowrank checkout, else the current directory (never inside the installed package)."""
    checkout = Path.cwd() / RESULTS_IN_CHECKOUT
    return checkout / group if checkout.is_dir() else Path.cwd()
