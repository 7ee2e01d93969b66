"""`python -m bench.report [PATH]`: print the tables and targets of a saved run (bench/results/latest.json)
again, as plain text (what bench/RESULTS.rst quotes), without re-running anything."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.common import RESULTS, render


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0]) if argv else RESULTS / "latest.json"
    latest = json.loads(path.read_text())
    machine = latest["machine"]
    print(f"machine: {machine['cpu_model']}, {machine['cores']} cores, {machine['memory_gib']} GiB, "
          f"Python {machine['python']}, {machine['os']}; run started {machine['date']}, "
          f"load average then {[round(x, 2) for x in machine['loadavg_at_start']]}; "
          f"whole run {latest.get('seconds')} s")
    for name, result in latest["results"].items():
        print(f"\n== {name} ({result.get('seconds')} s)")
        for tab in result.get("tables", []):
            print()
            print(render(tab))
        for target, verdict in result.get("targets", {}).items():
            print(f"  target {target}: {verdict['value']} (want {verdict['target']}): "
                  f"{'met' if verdict['met'] else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
