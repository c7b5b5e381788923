"""Measuring in fresh processes on a quiet machine (for ``bench_memory.py``).

Each measurement runs in a new Python process (``SCRIPT --one SPEC``, which prints one
``RESULT {json}`` line), so the peak memory of one cannot hide behind another's, and only once the
other cores are idle: on a 2-core machine one busy neighbour makes 2-thread torch several times
slower.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (Linux /proc/stat; 0.0 elsewhere)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    """CPU seconds used by this process's finished children."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def other_load(seconds: float = 2.0) -> float:
    """Cores kept busy by other processes over the next ``seconds`` (this one sleeps meanwhile)."""
    b0 = busy_cpu_s()
    time.sleep(seconds)
    return (busy_cpu_s() - b0) / seconds


def wait_for_quiet(max_busy: float, max_wait_s: float) -> float:
    """Wait (at most ``max_wait_s``) until other processes use under ``max_busy`` cores."""
    t0 = time.perf_counter()
    load = other_load()
    while load > max_busy and time.perf_counter() - t0 < max_wait_s:
        load = other_load(10.0)
    return load


def run_subprocess(script: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement in a fresh Python process; an error or crash becomes an ``error`` entry.

    Also records ``other_cores``: the cores other processes kept busy meanwhile (machine busy time
    minus the child's own CPU time, over the wall time). On a 2-core machine one busy neighbour
    makes 2-thread torch several times slower, so such a measurement is not to be trusted.
    """
    cmd = [sys.executable, os.path.abspath(script), "--one", json.dumps(spec)]
    t0, busy0, child0 = time.perf_counter(), busy_cpu_s(), children_cpu_s()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    other = max(0.0, (busy_cpu_s() - busy0 - (children_cpu_s() - child0)) / wall)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
            return {**result, "process_wall_s": wall, "other_cores": other}
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {
        **spec,
        "error": f"exit code {proc.returncode}: " + " | ".join(tail),
        "process_wall_s": wall,
        "other_cores": other,
    }


def measure(script: str, spec: dict[str, Any], retries: int, max_other: float) -> dict[str, Any]:
    """:func:`run_subprocess`, repeated (after waiting for a quiet machine) while others were busy."""
    for attempt in range(retries + 1):
        wait_for_quiet(max_other, max_wait_s=900)
        result = run_subprocess(script, spec)
        result["attempt"] = attempt
        result["contended"] = result["other_cores"] > max_other
        if not result["contended"]:
            break
        print(
            f"    contended ({result['other_cores']:.2f} other cores busy), retrying",
            file=sys.stderr,
            flush=True,
        )
    return result
