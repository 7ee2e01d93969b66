"""`python -m bench [--only NAME ...] [--quick] [--keep] [--devices N]`: run the benchmarks, print one
table per benchmark, save bench/results/<name>.json and bench/results/latest.json (all of them + the machine)."""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback

from bench.common import RESULTS, machine_info, print_tables, save

BENCHMARKS = ("latency", "fanout", "memory", "sustained", "webhooks", "dashboard", "multihost", "floor")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=BENCHMARKS, help="run only this benchmark (repeatable)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test, not a measurement")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (logs, databases)")
    parser.add_argument("--devices", type=int, metavar="N",
                        help="memory: devices of its big fan-out (default 1,000,000: issue 10's scale target)")
    args = parser.parse_args(argv)

    from bench.env import BenchEnv

    names = args.only or list(BENCHMARKS)
    machine = machine_info()
    print(f"machine: {machine['cpu_model']}, {machine['cores']} cores, Python {machine['python']}, "
          f"load {machine['loadavg_at_start']}, {machine['date']}", flush=True)
    out = RESULTS / "quick" if args.quick else RESULTS  # a smoke test never overwrites a measurement
    results, failed = {}, []
    started = time.monotonic()
    with BenchEnv(keep=args.keep) as env:
        if args.keep:
            print(f"scratch directory: {env.workdir}")
        for name in names:
            module = importlib.import_module(f"bench.{name}")
            print(f"\n== {name}{' (quick)' if args.quick else ''}", flush=True)
            began = time.monotonic()
            try:
                # --devices is the memory benchmark's alone: the others' sizes are fixed
                extra = {"devices": args.devices} if name == "memory" and args.devices else {}
                result = module.run(env, quick=args.quick, **extra)
            except Exception:  # noqa: BLE001 - report, run the others
                traceback.print_exc()
                failed.append(name)
                continue
            result["seconds"] = round(time.monotonic() - began, 1)
            result["quick"] = args.quick
            result["machine"] = machine
            results[name] = result
            print_tables(result)
            for target, verdict in result.get("targets", {}).items():
                print(f"  target {target}: {verdict['value']} (want {verdict['target']}): "
                      f"{'met' if verdict['met'] else 'MISSED'}")
            print(f"  ({result['seconds']} s)", flush=True)
            save(name, result, out)
    total = round(time.monotonic() - started, 1)
    if not args.only:
        save("latest", {"machine": machine, "seconds": total, "results": results}, out)
    else:
        _merge_latest(machine, results, out)
    print(f"\ndone in {total} s; JSON in {out}", flush=True)
    return 1 if failed else 0


def _merge_latest(machine: dict, results: dict, out) -> None:
    """--only: update those benchmarks in latest.json, keep the others' last results."""
    path = out / "latest.json"
    try:
        latest = json.loads(path.read_text())
    except (OSError, ValueError):
        latest = {"results": {}}
    latest["results"].update(results)
    latest["machine"] = machine
    save("latest", latest, out)


if __name__ == "__main__":
    sys.exit(main())
