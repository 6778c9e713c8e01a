"""This process's memory as Linux reports it in ``/proc/self/status``, for the memory benchmarks.

Imports nothing but the standard library, so a benchmark's torch-only child stays torch-only.
"""

from __future__ import annotations


def status_mb(field: str) -> float:
    """``field`` of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ``RssAnon``, ...) in MiB; ``OSError``
    without ``/proc``, ``KeyError`` for a field the kernel does not report."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)
