"""Facts about the host and process that the numbers depend on, and the markdown table they are printed as."""
from __future__ import annotations

import platform
import resource
import statistics


def peak_rss_bytes() -> int:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * (1 if platform.system() == "Darwin" else 1024)


def device_peak_bytes(devices):
    """The largest peak_bytes_in_use over `devices`, None where the backend keeps no statistics (the CPU)."""
    peaks = []
    for d in devices:
        try:
            stats = d.memory_stats()
        except Exception:  # noqa: BLE001 - some backends raise instead of returning None
            stats = None
        if not stats:
            return None
        peaks.append(stats.get("peak_bytes_in_use", stats.get("bytes_in_use", 0)))
    return max(peaks)


def cpu_model() -> str:
    """The host CPU's model name: CPU results depend on it (MKL and XLA:CPU pick kernels by vendor and ISA)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or "unknown CPU"
    if "cpu family" in fields:  # VMs often report a generic name ("AMD EPYC"); family/model tell the generation
        name += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    return name


def fmt_bytes(n):
    return "n/a" if n is None else f"{n / 2 ** 30:.2f} GiB"


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def timing(seconds: list) -> str:
    """Median step time with its range and count."""
    return (f"{median(seconds) * 1e3:.1f} ms  [min {min(seconds) * 1e3:.1f}, max {max(seconds) * 1e3:.1f}, "
            f"n={len(seconds)}]")


def print_table(rows):
    width = max(len(k) for k, _ in rows)
    print(f"| {'metric'.ljust(width)} | value |")
    print("|" + "-" * (width + 2) + "|-------|")
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v} |")


def print_profile(top: list, n_steps: int, trace_dir: str):
    print(f"\ntop traced ops over {n_steps} steps (trace in {trace_dir}):")
    print("| ms per step | share of traced time | op kind |")
    print("|---|---|---|")
    for ms, share, name in top:
        print(f"| {ms:.2f} | {100 * share:.1f} % | {name[:100]} |")
