"""The request path against a bare floor (DESIGN.md: "must stay within 2x of it"), side by side.

The floor is bench/floor_app.py: Bottle + the driver (the standard library's sqlite3, or psycopg),
doing by hand exactly the work of a POST (token hash lookup, membership, BEGIN IMMEDIATE, the message
and its push_jobs row, COMMIT, 201 + JSON) or of a history page. Both sides run under the real uWSGI
with the project's uwsgi.ini (same workers, same options; only `module` differs), each over its own
database made by the product's migrations and seeded the same way (a 2-member chat; a second chat
with HISTORY messages for the reads). No devices: the POST is measured, not the fan-out.

Both are driven by wrk (-t2 -c16, DURATION s per round, a Lua script in a temporary folder), in
rounds that alternate floor, product, floor, product ... so both sides see the same share of this
shared machine's noise. Per round: wrk's requests/s and latency percentiles, and the CPU of the
uWSGI master and workers (utime + stime from /proc/PID/stat before and after; workers
recycled by uWSGI are counted through the master's cutime + cstime) divided by the requests.

Phases: POST and GET on SQLite (the product with PUSH_DISPATCHER=external: no dispatcher at all),
one POST pair with the default on-demand dispatcher (forked by the workers; its own CPU is shown
apart), and POST on PostgreSQL (two temporary databases on TEST_DATABASE_URL's server; skipped, with
the reason, when it does not answer). Nothing is asserted.

`python -m bench.floor [--quick] [--py-spy]`: --py-spy adds one unmeasured round per side with py-spy
sampling one worker, and prints the top frames.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from configparser import ConfigParser
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from bench.common import machine_info, print_tables, save, table
from bench.procs import machine_busy_seconds
from chat_app import store
from notifier import db, schema
from tests.harness import ROOT, UwsgiServer

NAME = "floor"
WRK_THREADS, WRK_CONNECTIONS = 2, 16
DURATION, QUICK_DURATION = 8, 2
WARMUP = 1  # seconds of wrk per server and workload before its first measured round
PAIRS = {"post": 3, "get": 2, "on_demand": 1, "post_pg": 2}
HISTORY = 1_000  # messages in the history chat; a GET reads the newest HISTORY_PAGE
HISTORY_PAGE = 50
FLOOR_MODULE = "bench.floor_app:application"
PG_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def uwsgi_workers() -> int:
    """`processes` of the project's uwsgi.ini (the floor runs under the same file)."""
    parser = ConfigParser(strict=False, interpolation=None, inline_comment_prefixes=(";",))
    parser.read_string("\n".join(line for line in (ROOT / "uwsgi.ini").read_text().splitlines()
                                 if "=" in line or line.startswith("[")))
    return parser.getint("uwsgi", "processes")


# ---------------------------------------------------------------------------------------------- wrk

def wrk_binary() -> tuple[str | None, str]:
    """wrk's path and version, installing Debian's package when missing; (None, why) if it cannot."""
    path = shutil.which("wrk")
    if path is None and shutil.which("apt-get") and os.geteuid() == 0:
        print("  wrk missing: apt-get install -y wrk", flush=True)
        apt_env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (["apt-get", "install", "-y", "wrk"], ["apt-get", "update"], ["apt-get", "install", "-y", "wrk"]):
            subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300, env=apt_env)
            path = shutil.which("wrk")
            if path:
                break
    if path is None:
        return None, "wrk is not installed and could not be installed (Debian package `wrk`, needs root and apt-get)"
    answer = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    return path, (answer.stdout + answer.stderr).splitlines()[0].strip()


WRK_SCRIPT = """\
wrk.method = "%(method)s"
wrk.headers["Authorization"] = "Bearer %(token)s"
%(body)s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests": %%d, "duration_us": %%d, "bytes": %%d, "connect": %%d, ' ..
    '"read": %%d, "write": %%d, "status": %%d, "timeout": %%d, "p50_us": %%d, "p90_us": %%d, "p99_us": %%d, ' ..
    '"max_us": %%d, "mean_us": %%.1f}\\n', summary.requests, summary.duration, summary.bytes, e.connect, e.read,
    e.write, e.status, e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
"""


def write_script(directory: Path, name: str, method: str, token: str) -> Path:
    body = ('wrk.body = \'{"text": "hello world"}\'\nwrk.headers["Content-Type"] = "application/json"'
            if method == "POST" else "")
    path = directory / f"{name}.lua"
    path.write_text(WRK_SCRIPT % {"method": method, "token": token, "body": body})
    return path


def run_wrk(wrk: str, script: Path, url: str, seconds: int) -> dict:
    """One wrk run; its summary (from the script's done()), and its own CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    answer = subprocess.run(
        [wrk, f"-t{WRK_THREADS}", f"-c{WRK_CONNECTIONS}", f"-d{seconds}s", "--timeout", "5s", "--latency",
         "-s", str(script), url],
        capture_output=True, text=True, timeout=seconds + 30)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    found = re.search(r"^WRKJSON (\{.*\})$", answer.stdout, re.M)
    if answer.returncode != 0 or not found:
        raise RuntimeError(f"wrk failed ({answer.returncode}): {answer.stdout[-800:]} {answer.stderr[-800:]}")
    summary = json.loads(found.group(1))
    summary["wrk_cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    summary["text"] = answer.stdout[:found.start()].rstrip()
    return summary


# ---------------------------------------------------------------------------------------------- CPU

def _stat(pid: int):
    """(ppid, own utime+stime, reaped children's cutime+cstime) in clock ticks, or None."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])
    except (OSError, IndexError, ValueError):
        return None


def uwsgi_cpu(master: int) -> dict:
    """{pid: (own, children)} ticks for uWSGI's master and its direct children (the workers)."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            info = _stat(int(name))
            if info is not None and (int(name) == master or info[0] == master):
                out[int(name)] = info[1:]
    return out


def cpu_between(master: int, before: dict, after: dict) -> tuple[float, int]:
    """CPU seconds the master and workers used between two samples, and how many workers were
    replaced meanwhile (recycled by uWSGI): a reaped worker's whole life lands in the master's cutime,
    so its share before the first sample is taken off again."""
    ticks = sum(own - before.get(pid, (0, 0))[0] for pid, (own, _) in after.items())
    if master in before and master in after:
        ticks += after[master][1] - before[master][1]
    gone = [pid for pid in before if pid not in after]
    ticks -= sum(before[pid][0] for pid in gone)
    return ticks / CLK_TCK, len(gone)


def worker_pids(master: int) -> list[int]:
    return sorted(pid for pid in uwsgi_cpu(master) if pid != master)


# ------------------------------------------------------------------------------------- the servers

@dataclass
class Seed:
    token: str
    chat_id: int
    history_chat_id: int


def prepare(url: str) -> Seed:
    """The product's schema (its migrations), a sender and a second member, a 2-member chat, and a
    history chat of HISTORY messages (each with its push job, as the product writes them)."""
    engine = db.make_engine(url)
    try:
        db.migrate(engine)
        token, now = secrets.token_urlsafe(32), time.time()
        with db.writer(engine).begin() as conn:
            sender = store.create_user(conn, "sender", store.hash_token(token), now)
            other = store.create_user(conn, "other", store.hash_token(secrets.token_urlsafe(32)), now)
            chat_id = store.create_chat(conn, "floor", sender["id"], [other["id"]], now)
            history_id = store.create_chat(conn, "history", sender["id"], [other["id"]], now)
            for i in range(HISTORY):
                store.insert_message_with_job(conn, history_id, sender["id"], f"history message {i}", None, now + i)
        return Seed(token, chat_id, history_id)
    finally:
        engine.dispose()


@dataclass
class Side:
    label: str  # "floor", "product", "product (on-demand dispatcher)"
    server: UwsgiServer
    seed: Seed
    url: str

    @property
    def master(self) -> int:
        return self.server.process.pid


def start_side(label: str, workdir: Path, url: str, floor: bool, env: dict | None = None) -> Side:
    seed = prepare(url)
    server = UwsgiServer(workdir, env=env, database_url=url, args=("--module", FLOOR_MODULE) if floor else ())
    side = Side(label, server, seed, url)
    try:
        server.start(timeout=60)
    except BaseException:
        stop_side(side)
        raise
    return side


def stop_side(side: Side) -> None:
    """uWSGI, its dispatchers, and anything left in its process group."""
    pgid = side.server.process.pid if side.server.process is not None else None
    try:
        side.server.close()
    finally:
        if pgid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)


def newest_message_id(side: Side) -> int:
    with side.server.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.max(schema.messages.c.id))).scalar() or 0


# ------------------------------------------------------------------------------------- one round

class Runner:
    def __init__(self, wrk: str, scripts: Path, seconds: int):
        self.wrk, self.scripts, self.seconds = wrk, scripts, seconds
        self.rounds: list[dict] = []

    def _target(self, side: Side, workload: str) -> tuple[Path, str]:
        method = "GET" if workload == "get" else "POST"
        chat = side.seed.history_chat_id if method == "GET" else side.seed.chat_id
        query = f"?limit={HISTORY_PAGE}" if method == "GET" else ""
        script = write_script(self.scripts, f"{side.label.split()[0]}-{method}-{side.server.port}", method,
                              side.seed.token)
        return script, side.server.url(f"/v1/chats/{chat}/messages{query}")

    def warm(self, side: Side, workload: str) -> None:
        script, url = self._target(side, workload)
        run_wrk(self.wrk, script, url, WARMUP)

    def measure(self, side: Side, workload: str, db_name: str, pair: int, profile: Path | None = None) -> dict:
        script, url = self._target(side, workload)
        first_id = newest_message_id(side) if workload != "get" else None
        spy = None
        if profile is not None:
            spy = start_py_spy(worker_pids(side.master)[0], self.seconds, profile)
        time.sleep(0.3)  # let the previous round's stragglers settle
        before, busy = uwsgi_cpu(side.master), machine_busy_seconds()
        dispatchers_before, backends_before = _dispatcher_cpu(side), _backend_cpu(side)
        result = run_wrk(self.wrk, script, url, self.seconds)
        after, busy = uwsgi_cpu(side.master), machine_busy_seconds() - busy
        dispatcher_cpu = round(sum(_dispatcher_cpu(side).values()) - sum(dispatchers_before.values()), 2)
        backends = _backend_cpu(side)
        backend_cpu = round(sum(v - backends_before.get(pid, 0.0) for pid, v in backends.items()), 2)
        if spy is not None:
            spy.wait(timeout=self.seconds + 30)
        cpu, recycled = cpu_between(side.master, before, after)
        requests = result["requests"]
        seconds = result["duration_us"] / 1e6
        row = {
            "workload": workload, "db": db_name, "side": side.label, "pair": pair, "profiled": profile is not None,
            "requests": requests, "errors": sum(result[k] for k in ("connect", "write", "timeout")),
            # uWSGI's http-socket closes the connection after every answer (both sides): wrk counts each
            # close as a read error and reconnects; the inserted rows show the answers were whole
            "closed_by_server": result["read"],
            "non_2xx": result["status"], "seconds": round(seconds, 2),
            "rps": round(requests / seconds, 1) if seconds else None,
            "p50_ms": result["p50_us"] / 1000, "p90_ms": result["p90_us"] / 1000,
            "p99_ms": result["p99_us"] / 1000, "max_ms": result["max_us"] / 1000,
            "uwsgi_cpu_s": round(cpu, 2), "cpu_ms_per_request": round(cpu * 1000 / requests, 3) if requests else None,
            "workers_recycled": recycled, "dispatcher_cpu_s": dispatcher_cpu, "wrk_cpu_s": round(result["wrk_cpu_s"], 2),
            "machine_busy_s": round(busy, 2), "postgres_cpu_s": backend_cpu if side.url.startswith("postgresql") else None,
            "postgres_cpu_ms_per_request": (round(backend_cpu * 1000 / requests, 3)
                                            if side.url.startswith("postgresql") and requests else None),
            "other_cpu_s": round(max(0.0, busy - cpu - result["wrk_cpu_s"] - max(dispatcher_cpu, 0) - backend_cpu), 2),
            "loadavg_1m": round(os.getloadavg()[0], 2), "wrk_output": result["text"],
        }
        if first_id is not None:
            row["messages_inserted"] = newest_message_id(side) - first_id
        if not row["profiled"]:
            self.rounds.append(row)
        print(f"  {workload:9} {db_name:10} {side.label:30} pair {pair}: {row['rps']:>8} req/s, p50 {row['p50_ms']:.2f} ms,"
              f" p99 {row['p99_ms']:.2f} ms, {row['cpu_ms_per_request']} ms CPU/req, errors {row['errors']},"
              f" non-2xx {row['non_2xx']}{', profiled' if profile else ''}", flush=True)
        return row

    def pairs(self, floor: Side, product: Side, workload: str, db_name: str, count: int,
              profile_dir: Path | None = None) -> None:
        """floor, product, floor, product ...; with profile_dir, one more unmeasured pair under py-spy."""
        self.warm(floor, workload)
        self.warm(product, workload)
        for pair in range(1, count + 1):
            self.measure(floor, workload, db_name, pair)
            self.measure(product, workload, db_name, pair)
        if profile_dir is not None and shutil.which("py-spy", path=str(Path(sys.executable).parent)):
            for side in (floor, product):
                out = profile_dir / f"{workload}-{db_name}-{side.label.split()[0]}.txt"
                self.measure(side, workload, db_name, 0, profile=out)


def _backend_cpu(side: Side) -> dict:
    """PostgreSQL (same machine): CPU seconds of the server processes serving this side's database."""
    if not side.url.startswith("postgresql"):
        return {}
    with side.server.engine.connect() as conn:
        pids = conn.execute(sa.text("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                                    "AND pid <> pg_backend_pid()")).scalars().all()
    out = {}
    for pid in pids:
        info = _stat(pid)
        if info is not None:
            out[pid] = info[1] / CLK_TCK
    return out


def _dispatcher_cpu(side: Side) -> dict:
    out = {}
    for pid in side.server.dispatcher_pids():
        info = _stat(pid)
        if info is not None:
            out[pid] = info[1] / CLK_TCK
    return out


# ------------------------------------------------------------------------------------- py-spy

def start_py_spy(pid: int, seconds: int, out: Path) -> subprocess.Popen:
    binary = str(Path(sys.executable).parent / "py-spy")
    return subprocess.Popen([binary, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "250",
                             "--format", "raw", "--output", str(out), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarize_profile(path: Path, top: int = 15) -> dict:
    """From py-spy's raw (collapsed) stacks: the leaf frames (self time) and the frames on the stack
    (inclusive time), as shares of all samples."""
    leaves, inclusive, total = Counter(), Counter(), 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_short(frame) for frame in stack.split(";")]
        total += int(count)
        leaves[frames[-1]] += int(count)
        for frame in set(frames):
            inclusive[frame] += int(count)
    share = (lambda n: round(100.0 * n / total, 1)) if total else (lambda n: 0.0)
    return {"samples": total, "self": [[f, share(n)] for f, n in leaves.most_common(top)],
            "inclusive": [[f, share(n)] for f, n in inclusive.most_common(top * 2)]}


def _short(frame: str) -> str:
    """`func (path/to/site-packages/pkg/mod.py:12)` -> `func (pkg/mod.py:12)`."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", "/work/main/", "lib/python3"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{name} ({where})" if where else name


# ------------------------------------------------------------------------------------- the run

def code_version() -> str:
    """The commit measured, and whether the product's code differed from it (a work tree in progress)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "chat_app", "notifier", "uwsgi.ini"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}{' + uncommitted changes in chat_app/notifier' if dirty else ''}"


def _pg_unreachable() -> str | None:
    from tests.pg import unreachable_reason  # imports pytest: only when PostgreSQL is measured
    return unreachable_reason(PG_URL)


def run(env=None, quick: bool = False, profile: bool = False) -> dict:
    """`env` (a bench.env.BenchEnv) lends its scratch directory; the fakes are not used."""
    workdir = Path(tempfile.mkdtemp(prefix="floor-", dir=getattr(env, "workdir", None)))
    load_start = list(os.getloadavg())
    seconds = QUICK_DURATION if quick else DURATION
    pairs = {key: 1 for key in PAIRS} if quick else PAIRS
    wrk, version = wrk_binary()
    result = {"name": NAME, "wrk": version, "wrk_args": f"-t{WRK_THREADS} -c{WRK_CONNECTIONS} -d{seconds}s --latency",
              "workers": uwsgi_workers(), "code": code_version(), "loadavg_start": load_start, "rounds": [],
              "skipped": {}}
    if wrk is None:
        print(f"  skipped: {version}", flush=True)
        result["skipped"]["all"] = version
        result["tables"] = [table("bare floor vs product: skipped", ["reason"], [[version]])]
        return result
    profile_dir = workdir / "profiles" if profile else None
    if profile_dir:
        profile_dir.mkdir()
    runner = Runner(wrk, workdir, seconds)
    try:
        sides: list[Side] = []
        try:
            floor = start_side("floor", workdir / "floor-sqlite", f"sqlite:///{workdir / 'floor.sqlite3'}", True)
            sides.append(floor)
            product = start_side("product", workdir / "product-sqlite", f"sqlite:///{workdir / 'product.sqlite3'}",
                                 False, {"PUSH_DISPATCHER": "external"})
            sides.append(product)
            runner.pairs(floor, product, "post", "sqlite", pairs["post"], profile_dir)
            runner.pairs(floor, product, "get", "sqlite", pairs["get"], profile_dir)
            stop_side(sides.pop())
            on_demand = start_side("product (on-demand dispatcher)", workdir / "product-on-demand",
                                   f"sqlite:///{workdir / 'on-demand.sqlite3'}", False)
            sides.append(on_demand)
            runner.pairs(floor, on_demand, "post", "sqlite", pairs["on_demand"])
        finally:
            for side in reversed(sides):
                stop_side(side)
        reason = _pg_unreachable()
        if reason:
            print(f"  PostgreSQL skipped: {reason}", flush=True)
            result["skipped"]["postgresql"] = reason
        else:
            from tests.pg import temporary_database
            with temporary_database(PG_URL) as floor_url, temporary_database(PG_URL) as product_url:
                sides = []
                try:
                    floor = start_side("floor", workdir / "floor-pg", floor_url, True)
                    sides.append(floor)
                    product = start_side("product", workdir / "product-pg", product_url, False,
                                         {"PUSH_DISPATCHER": "external"})
                    sides.append(product)
                    runner.pairs(floor, product, "post", "postgresql", pairs["post_pg"], profile_dir)
                finally:
                    for side in reversed(sides):
                        stop_side(side)
    finally:
        result["rounds"] = runner.rounds
        result["loadavg_end"] = list(os.getloadavg())
        if profile_dir:
            result["profiles"] = {p.stem: summarize_profile(p) for p in sorted(profile_dir.glob("*.txt"))
                                  if p.stat().st_size}
        if env is None or not getattr(env, "keep", False):
            shutil.rmtree(workdir, ignore_errors=True)
    result["summary"] = summarize(runner.rounds)
    result["tables"] = tables(result)
    return result


GROUPS = (("post", "sqlite", "product"), ("post", "sqlite", "product (on-demand dispatcher)"),
          ("get", "sqlite", "product"), ("post", "postgresql", "product"))
LABELS = {("post", "sqlite"): "POST message, SQLite", ("get", "sqlite"): f"GET {HISTORY_PAGE} messages, SQLite",
          ("post", "postgresql"): "POST message, PostgreSQL"}


def _aggregate(rows: list[dict]) -> dict:
    requests, seconds = sum(r["requests"] for r in rows), sum(r["seconds"] for r in rows)
    cpu = sum(r["uwsgi_cpu_s"] for r in rows)
    return {"rounds": len(rows), "requests": requests, "errors": sum(r["errors"] + r["non_2xx"] for r in rows),
            "rps": round(requests / seconds, 1) if seconds else None,
            "p50_ms": round(statistics.median(r["p50_ms"] for r in rows), 2),
            "p99_ms": round(statistics.median(r["p99_ms"] for r in rows), 2),
            "cpu_ms_per_request": round(cpu * 1000 / requests, 3) if requests else None,
            "dispatcher_cpu_s": round(sum(r["dispatcher_cpu_s"] for r in rows), 2),
            "postgres_cpu_ms_per_request": (round(sum(r["postgres_cpu_s"] for r in rows) * 1000 / requests, 3)
                                            if requests and rows[0]["postgres_cpu_s"] is not None else None)}


def summarize(rounds: list[dict]) -> list[dict]:
    """Per comparison: the floor's and the product's aggregates, and product/floor ratios. The floor
    rows of a comparison are those alternated with that product's rounds (same pairs)."""
    out = []
    for workload, db_name, product_label in GROUPS:
        product_rows = [r for r in rounds if (r["workload"], r["db"], r["side"]) == (workload, db_name, product_label)]
        if not product_rows:
            continue
        first, last = (rounds.index(product_rows[0]), rounds.index(product_rows[-1]))
        floor_rows = [r for r in rounds[max(first - 1, 0):last + 1] if r["side"] == "floor"
                      and (r["workload"], r["db"]) == (workload, db_name)]
        floor, product = _aggregate(floor_rows), _aggregate(product_rows)
        ratio = {key: (round(product[key] / floor[key], 2) if floor[key] and product[key] else None)
                 for key in ("rps", "p50_ms", "p99_ms", "cpu_ms_per_request", "postgres_cpu_ms_per_request")}
        out.append({"workload": workload, "db": db_name, "product": product_label, "floor_stats": floor,
                    "product_stats": product, "product_over_floor": ratio})
    return out


def tables(result: dict) -> list:
    body = []
    for entry in result["summary"]:
        label = LABELS[(entry["workload"], entry["db"])]
        for side, stats in (("floor", entry["floor_stats"]), (entry["product"], entry["product_stats"])):
            body.append([label, side, stats["rounds"], stats["requests"], stats["errors"], stats["rps"],
                         stats["p50_ms"], stats["p99_ms"], stats["cpu_ms_per_request"],
                         stats["postgres_cpu_ms_per_request"]])
        ratio = entry["product_over_floor"]
        body.append([label, "  product / floor", None, None, None, ratio["rps"], ratio["p50_ms"], ratio["p99_ms"],
                     ratio["cpu_ms_per_request"], ratio["postgres_cpu_ms_per_request"]])
    notes = [f"wrk {result['wrk_args']} ({result['wrk']}); both sides under the project's uwsgi.ini, "
             f"{result['workers']} workers, only `module` differs; rounds alternate floor, product, floor, ...; "
             f"code {result['code']}",
             "req/s: requests over wrk's measured time; p50, p99: the median over rounds of wrk's per-round "
             "percentile; CPU: uWSGI master + workers (utime+stime), per request",
             "errors: wrk's connect and write errors and timeouts plus non-2xx answers (a POST answers 201, a GET "
             "200); uWSGI's http-socket closes every connection after its answer (both sides), which wrk counts as "
             "a read error: those are left out (closed_by_server in the JSON), and rows inserted = requests shows "
             "the POSTs were answered",
             "product: PUSH_DISPATCHER=external (no dispatcher); on-demand: the default, no devices (the "
             "dispatcher's own CPU is not in the column, see dispatcher_cpu_s in the JSON)",
             "PG CPU: the PostgreSQL server processes serving that side's database (same machine), per request",
             f"load average at start {_load(result['loadavg_start'])}, at end {_load(result['loadavg_end'])}"]
    for what, reason in result["skipped"].items():
        notes.append(f"skipped {what}: {reason}")
    out = [table("Product vs bare floor (Bottle + the driver, same work), side by side",
                 ["workload", "side", "rounds", "requests", "errors", "req/s", "p50 ms", "p99 ms", "CPU ms/req",
                  "PG CPU ms/req"],
                 body, notes)]
    rounds = [[r["workload"], r["db"], r["side"], r["pair"], r["rps"], r["p50_ms"], r["p99_ms"],
               r["cpu_ms_per_request"], r["workers_recycled"], r["wrk_cpu_s"], r["other_cpu_s"], r["loadavg_1m"]]
              for r in result["rounds"]]
    out.append(table("Every round, in the order run",
                     ["workload", "db", "side", "pair", "req/s", "p50 ms", "p99 ms", "CPU ms/req", "recycled",
                      "wrk CPU s", "other CPU s", "load 1m"], rounds,
                     ["recycled: workers replaced during the round (uwsgi.ini: by memory or age); their CPU is counted "
                      "through the master", "other CPU s: the machine's busy time minus uWSGI, wrk and the "
                      "dispatcher (and PostgreSQL's backends): the rest of this shared machine during the round"]))
    for name, prof in result.get("profiles", {}).items():
        rows = [[frame, pct, None] for frame, pct in prof["self"][:12]]
        rows += [[frame, None, pct] for frame, pct in prof["inclusive"][:20]]
        out.append(table(f"py-spy, one worker, {name} ({prof['samples']} samples, idle excluded)",
                         ["frame", "self %", "on stack %"], rows))
    return out


def _load(values) -> str:
    return "/".join(f"{v:.2f}" for v in values)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 pair per comparison, 2 s rounds: a smoke test")
    parser.add_argument("--py-spy", action="store_true", help="profile one worker per side in an extra round")
    args = parser.parse_args(argv)
    machine = machine_info()
    print(f"machine: {machine['cpu_model']}, {machine['cores']} cores, load {machine['loadavg_at_start']}", flush=True)
    began = time.monotonic()
    result = run(None, quick=args.quick, profile=args.py_spy)
    result["seconds"] = round(time.monotonic() - began, 1)
    result["quick"] = args.quick
    result["machine"] = machine
    print_tables(result)
    path = save(NAME, result, Path(__file__).resolve().parent / "results" / ("quick" if args.quick else ""))
    print(f"\n({result['seconds']} s; JSON in {path})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
