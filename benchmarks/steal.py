"""CPU time the hypervisor gave to other guests ("steal" in /proc/stat): on a shared VM it lowers every number a
benchmark prints, so the benchmarks report it beside the load average."""
import os
from typing import Optional


def stolen_cpu_seconds() -> Optional[float]:
    """All CPUs' steal time since boot, in seconds; None where the kernel does not report it (not Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")  # cpu user nice system idle iowait irq softirq steal
    except (OSError, IndexError, ValueError):
        return None


def stolen_share(start: Optional[float], wall_seconds: float) -> str:
    """'12.3 % of 2 cores' wall time' since `start` (a stolen_cpu_seconds() reading), or 'n/a'."""
    end = stolen_cpu_seconds()
    if start is None or end is None or wall_seconds <= 0:
        return "n/a"
    cores = os.cpu_count() or 1
    return f"{100 * (end - start) / (wall_seconds * cores):.1f} % of {cores} cores' wall time"
