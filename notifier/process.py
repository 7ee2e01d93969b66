"""PushProcess: the dispatcher as a multiprocessing.Process started from a uWSGI worker.

A plain Process started from a uWSGI worker holds the listening socket and the client's
connection, turns into a zombie, and either blocks the worker's exit (daemon=False) or is killed
by it (daemon=True); see shared/UWSGI.md for the measurements. This subclass undoes each:
- the parent forgets it (forget()), so the worker's atexit neither joins nor terminates it; the
  Waker keeps it and reaps it with is_alive() on later requests;
- run() starts a new session, ignores the signals a uWSGI worker's children must not act on,
  installs its own SIGTERM/SIGINT handling, and closes every socket it inherited;
- the parent closes its SQLite connections before the fork (Waker.start), so no SQLite state
  crosses it (notifier.db.close_sqlite_before_fork says why that matters).
The outbox, not this process, is what makes pushes durable: if it dies, the next dispatcher of
this host takes its leases over.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import multiprocessing.process
import os
import signal
import stat

import setproctitle

from notifier import db
from notifier.config import Settings, resolve_database_url
from notifier.metrics import DispatcherMetrics
from notifier.providers import build_providers
from notifier.runner import Runner
from notifier.wakeup import Listener

logger = logging.getLogger(__name__)

PROCESS_TITLE = "chat-notifier"  # what ps and top show, instead of the uWSGI worker it was forked from
DISPATCHER_NICE = 10  # CPU priority below the uWSGI workers (a supervised `python -m notifier`: its supervisor's)


class PushProcess(multiprocessing.Process):
    """Runs this host's dispatcher until it has been idle for PUSH_IDLE_EXIT seconds."""

    def __init__(self, settings: Settings):
        # daemon=False: multiprocessing would terminate a daemonic child when the worker exits
        super().__init__(name="chat-notifier", daemon=False)
        self.settings = settings  # plain and picklable: works under fork, forkserver and spawn

    def forget(self) -> None:
        """Take this process out of multiprocessing's child list, so no atexit joins or kills it."""
        multiprocessing.process._children.discard(self)

    def run(self) -> None:
        """The child's entry point."""
        set_title()
        detach_from_server()
        lower_priority()
        raise SystemExit(run_dispatcher(self.settings, idle_exit=self.settings.push_idle_exit))


def set_title(title: str = PROCESS_TITLE) -> None:
    """Show as `title` in ps and top, not as the uWSGI worker we were forked from."""
    setproctitle.setproctitle(title)  # argv (ps aux) where Python owns it
    setproctitle.setthreadtitle(title)  # the main thread's name is the process's (top, ps -e, pgrep)
    try:
        import uwsgi  # provided only inside uWSGI's embedded interpreter, which owns argv there
    except ImportError:
        return
    uwsgi.setprocname(title)


def detach_from_server() -> None:
    """Cut every tie a fork of a uWSGI worker has to the server: session, signals, sockets."""
    try:
        os.setsid()  # a signal to the worker's process group no longer reaches us
    except PermissionError:
        pass  # already a session leader (python -m notifier under some supervisors)
    for sig in (signal.SIGHUP, signal.SIGPIPE, signal.SIGUSR1, signal.SIGUSR2):
        # inherited C handlers would act for uWSGI: SIGHUP sent to us would recycle our parent
        signal.signal(sig, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    close_inherited_sockets()


def lower_priority(nice: int = DISPATCHER_NICE) -> None:
    """Let the web workers that started us come first: a fan-out uses the CPU they leave, so a
    10,000-device message does not slow the POSTs beside it (measured: bench/RESULTS.rst).

    setsid() also put us in a scheduler autogroup of our own (Linux with sched_autogroup_enabled,
    the default of most distributions). The CPU is then shared between autogroups first, and a
    process's nice only ranks it inside its group: the dispatcher alone in its group took as much
    CPU as all the uWSGI workers together, whatever its nice. So the group's nice is lowered too.
    """
    os.nice(nice)
    try:
        with open("/proc/self/autogroup", "w") as autogroup:
            autogroup.write(str(nice))
    except OSError:
        pass  # no autogroups here (or disabled): the process's nice is all that counts


def close_inherited_sockets() -> None:
    """Close every socket fd above stderr: the listening socket, client connections, uWSGI's IPC."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= 2:
            continue
        try:
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                os.close(fd)
        except OSError:
            pass  # the fd of the listdir itself, already closed


# the dispatcher allocates some 50-100 objects per push, nearly all freed by reference counting;
# at the default threshold (700) the cyclic collector ran every ten pushes or so and took about
# 8 us of CPU per push in an APNs fan-out (a tenth of the dispatcher's CPU), finding little
GC_GEN0_THRESHOLD = 20_000


def tune_gc() -> None:
    """Keep the cyclic garbage collector off the send path: what exists once the dispatcher has
    started (modules, compiled statements, the settings) is frozen out of every collection, and
    young objects are collected every GC_GEN0_THRESHOLD allocations instead of 700."""
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def run_dispatcher(settings: Settings, idle_exit: float | None) -> int:
    """Serve until idle (on demand) or until stopped: SIGTERM/SIGINT once for a warm stop (finish
    the batches in hand), twice to stop at once. Returns an exit code."""
    async def main() -> int:
        engine = db.make_engine(resolve_database_url(settings.database_url))
        runner = Runner(settings, engine, lambda: build_providers(settings), Listener(settings),
                        metrics=DispatcherMetrics(settings), idle_exit=idle_exit)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, runner.request_stop)
        tune_gc()
        try:
            return await runner.run()
        finally:
            engine.dispose()

    try:
        return asyncio.run(main())
    except Exception:  # noqa: BLE001 - log; the next dispatcher of this host takes the leases over
        logger.exception("notifier: dispatcher crashed")
        return 1
