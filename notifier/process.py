"""PushProcess: the dispatcher as a multiprocessing.Process started from a uWSGI worker.

A plain Process started from a uWSGI worker holds the listening socket and the client's
connection, turns into a zombie, and either blocks the worker's exit (daemon=False) or is killed
by it (daemon=True); see shared/UWSGI.md for the measurements. This subclass undoes each:
- the parent forgets it (forget()), so the worker's atexit neither joins nor terminates it; the
  Waker keeps it and reaps it with is_alive() on later requests;
- run() starts a new session, ignores the signals a uWSGI worker's children must not act on,
  installs its own SIGTERM/SIGINT handling, and closes every socket it inherited.
The outbox, not this process, is what makes pushes durable: if it dies, its leases expire.
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.process
import os
import signal
import stat

from notifier.config import Settings

logger = logging.getLogger(__name__)

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
        detach_from_server()
        lower_priority()
        raise SystemExit(run_dispatcher(self.settings, idle_exit=self.settings.push_idle_exit))


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


def run_dispatcher(settings: Settings, idle_exit: float | None) -> int:
    """Serve until idle (on demand) or until SIGTERM/SIGINT (both modes). Returns an exit code."""
    from notifier.dispatcher import serve

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            # first signal: finish the batch in hand and release the rest; leases cover a crash
            loop.add_signal_handler(sig, stop.set)
        return await serve(settings, idle_exit=idle_exit, stop=stop)

    try:
        return asyncio.run(main())
    except Exception:  # noqa: BLE001 - log, then let the outbox's leases hand the work on
        logger.exception("notifier: dispatcher crashed")
        return 1
