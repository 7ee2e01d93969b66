"""Who used the CPU during a phase: uWSGI (master, workers and whatever they forked in their process
group), the dispatcher, the fakes, the benchmark itself, and everything else on the machine."""
from __future__ import annotations

import os
import signal
from pathlib import Path

from bench.common import cpu_seconds


def _stat(pid: int):
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return int(fields[1]), int(fields[2])  # ppid, pgid
    except (OSError, IndexError, ValueError):
        return None


def group_pids(pgid: int) -> list[int]:
    """Every live process whose process group is `pgid`."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            info = _stat(int(name))
            if info is not None and info[1] == pgid:
                pids.append(int(name))
    return pids


def kill_worker_children(master: int) -> int:
    """SIGKILL what uWSGI's workers forked in uWSGI's process group (the naive baselines' processes)."""
    killed = 0
    workers = {pid for pid in group_pids(master) if (_stat(pid) or (0, 0))[0] == master}
    for pid in group_pids(master):
        info = _stat(pid)
        if info is not None and info[0] in workers:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    return killed


def machine_busy_seconds() -> float:
    """CPU seconds spent busy (not idle/iowait) by the whole machine since boot."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds per named group of processes between start() and stop()."""

    def __init__(self, groups):
        self.groups = groups  # name -> callable returning pids (called at start and stop)
        self.before: dict = {}

    def _sample(self) -> dict:
        out = {}
        for name, pids in self.groups.items():
            for pid in pids():
                value = cpu_seconds(pid)
                if value is not None:
                    out[(name, pid)] = value
        return out

    def start(self) -> None:
        self.before = self._sample()
        self.machine_before = machine_busy_seconds()

    def stop(self) -> dict:
        after = self._sample()
        used: dict = {name: 0.0 for name in self.groups}
        for key, value in after.items():
            used[key[0]] += value - self.before.get(key, 0.0)  # a process born meanwhile counts from 0
        total = machine_busy_seconds() - self.machine_before
        used = {name: round(value, 2) for name, value in used.items()}
        used["other"] = round(max(0.0, total - sum(used.values())), 2)
        used["machine"] = round(total, 2)
        return used
