"""The WSGI entry point for uWSGI: `module = chat_app.wsgi:application`.

Loaded once in uWSGI's master (uwsgi.ini: `lazy-apps = false`), which then forks the workers;
create_app() leaves no database connection open, so each worker opens its own after the fork.
Configuration errors stop the start-up here, naming the variable. Under uWSGI, the notifier's
watchdog runs every second in one worker (a uWSGI timer): it starts a dispatcher when work is
pending and none lives on this host, so no lost wake-up leaves a message waiting.
"""
from __future__ import annotations

import atexit
import gc
import logging

try:
    import uwsgi  # only inside uWSGI: the module its embedded interpreter provides
except ImportError:
    uwsgi = None

from chat_app.app import create_app
from notifier import check_configuration, load_settings

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s")

settings = load_settings()
check_configuration(settings)
logging.getLogger(__name__).info("chat_app: starting with %s", settings.redacted())
application = create_app(settings)
# close the worker's connections cleanly when it exits
atexit.register(application.config["chat.context"].engine.dispose)
WATCHDOG_INTERVAL = 1  # seconds (uWSGI timers count whole seconds)


def _watchdog(_signum: int) -> None:
    try:
        application.config["chat.waker"].watch()
    except Exception:  # noqa: BLE001 - a failed tick (database down) is retried on the next one
        logging.getLogger(__name__).warning("chat_app: notifier watchdog failed", exc_info=True)


if uwsgi is not None and "chat.waker" in application.config:
    # registered in the master before the fork, so every worker knows the handler; "worker" runs
    # each tick in the first free worker, between requests, where forking a dispatcher is safe
    signum = next(n for n in range(1, 256) if not uwsgi.signal_registered(n))
    uwsgi.register_signal(signum, "worker", _watchdog)
    uwsgi.add_timer(signum, WATCHDOG_INTERVAL)

# everything loaded so far lives as long as the process: keep it out of the garbage collector, so
# forked workers do not copy those pages by touching them, and exit (a reload) stays fast
gc.freeze()
