"""The WSGI entry point for uWSGI: `module = chat_app.wsgi:application`.

Loaded in each worker (uwsgi.ini sets lazy-apps), so every worker opens its own database pool
after the fork. Configuration errors stop the start-up here, naming the variable.
"""
from __future__ import annotations

import atexit
import gc
import logging

from chat_app.app import create_app
from notifier.config import load_settings
from notifier.providers import check_configuration

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s")

settings = load_settings()
check_configuration(settings)
logging.getLogger(__name__).info("chat_app: starting with %s", settings.redacted())
application = create_app(settings)
# close the worker's connections cleanly when it exits
atexit.register(application.config["chat.context"].engine.dispose)
# everything loaded so far lives as long as the process: keep it out of the garbage collector, so
# forked workers do not copy those pages by touching them, and exit (a reload) stays fast
gc.freeze()
