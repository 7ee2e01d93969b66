"""Small shared pieces: percentiles, plain-text tables, machine description, JSON results."""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def percentile(values, q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation; None for no values."""
    data = sorted(values)
    if not data:
        return None
    if len(data) == 1:
        return data[0]
    rank = (len(data) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (rank - low)


def summary_ms(latencies_s) -> dict:
    """p50/p95/p99/max of latencies given in seconds, in milliseconds."""
    return {name: _ms(percentile(latencies_s, q)) for name, q in (("p50", 50), ("p95", 95), ("p99", 99), ("max", 100))}


def _ms(value):
    return None if value is None else round(value * 1000.0, 2)


def fmt(value) -> str:
    """A table cell."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(title: str, columns: list[str], rows: list[list], notes: list[str] | None = None) -> dict:
    """A table as data (kept in the JSON, printed by render())."""
    return {"title": title, "columns": columns, "rows": rows, "notes": notes or []}


def render(tab: dict) -> str:
    """Plain text, aligned columns: text left, numbers right."""
    cells = [[fmt(v) for v in row] for row in tab["rows"]]
    widths = [len(c) for c in tab["columns"]]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row)]
    numeric = [all(isinstance(row[i], (int, float)) or row[i] is None for row in tab["rows"]) if tab["rows"] else False
               for i in range(len(widths))]

    def line(values):
        return "  ".join((v.rjust(w) if num else v.ljust(w)) for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [tab["title"], line(tab["columns"]), line(["-" * w for w in widths])]
    out += [line(row) for row in cells]
    out += [f"  * {note}" for note in tab["notes"]]
    return "\n".join(out)


def print_tables(result: dict) -> None:
    for tab in result.get("tables", []):
        print()
        print(render(tab), flush=True)


def machine_info() -> dict:
    """CPU model, cores, memory, Python, OS, load and the date: what the numbers depend on."""
    model = platform.processor() or "unknown"
    try:
        for text_line in Path("/proc/cpuinfo").read_text().splitlines():
            if text_line.startswith("model name"):
                model = text_line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        for text_line in Path("/proc/meminfo").read_text().splitlines():
            if text_line.startswith("MemTotal:"):
                memory = round(int(text_line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "memory_gib": memory,
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "os": f"{platform.system()} {platform.release()}",
        "loadavg_at_start": list(os.getloadavg()),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def save(name: str, result: dict, directory: Path = RESULTS) -> Path:
    """Write <directory>/<name>.json atomically (bench/results/ by default)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


class Stopwatch:
    """with Stopwatch() as sw: ...; sw.seconds"""

    def __enter__(self):
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.started


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (/proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def proc_status(pid: int, key: str) -> int | None:
    """A kB value from /proc/PID/status (VmHWM, VmRSS), in kB."""
    try:
        for text_line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if text_line.startswith(key + ":"):
                return int(text_line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None
