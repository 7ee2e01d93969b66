"""`python -m notifier`: the dispatcher in the foreground, for a supervisor (uWSGI
smart-attach-daemon2, systemd, a container). It never exits for idleness.

    python -m notifier [--pidfile PATH]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from notifier.config import ConfigError, load_settings
from notifier.process import close_inherited_sockets, run_dispatcher, set_title


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, validate the configuration, serve until SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m notifier", description=__doc__.splitlines()[0])
    parser.add_argument("--pidfile", help="write our pid here (uWSGI smart-attach-daemon2 watches it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    set_title()
    close_inherited_sockets()  # a daemon started by uWSGI's master inherits its listening socket
    if args.pidfile:
        with open(args.pidfile, "w") as handle:
            handle.write(f"{os.getpid()}\n")
    return run_dispatcher(settings, idle_exit=None)


if __name__ == "__main__":
    sys.exit(main())
