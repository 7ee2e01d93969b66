"""The test harness itself: a test session that dies leaves no uWSGI behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from tests.harness import ROOT, pid_alive, wait_until


def test_a_uwsgi_started_by_a_session_that_is_killed_stops_with_it(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        sys.path.insert(0, {str(ROOT)!r})
        from tests.harness import UwsgiServer
        server = UwsgiServer(Path({str(tmp_path)!r}), env={{"PUSH_DISPATCHER": "external"}}).start(timeout=60)
        print(server.process.pid, flush=True)
        time.sleep(120)
    """)
    session = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    master = None
    try:
        master = int(session.stdout.readline())
        assert pid_alive(master)
        session.send_signal(signal.SIGKILL)  # no finalizer runs: only the kernel can stop uWSGI now
        session.wait(10)
        wait_until(lambda: not pid_alive(master), 30, message="the orphaned uWSGI master to stop")
    finally:
        if session.poll() is None:
            session.kill()
            session.wait(10)
        if master is not None and pid_alive(master):
            os.killpg(master, signal.SIGKILL)
