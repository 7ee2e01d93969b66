"""Alembic's environment for the service's schema.

Two ways in. At start-up, notifier.db.migrate() passes its connection in
``config.attributes["connection"]``, already inside the transaction that holds the migration lock:
the revisions run in that transaction and this file opens nothing. From the command line, with the
alembic.ini at the project root (``alembic check``, ``alembic revision --autogenerate``,
``alembic upgrade head``), it connects to DATABASE_URL, default the SQLite file ``make run`` uses,
and takes the same lock as a host starting up.
"""
from __future__ import annotations

from alembic import context

config = context.config
connection = config.attributes.get("connection")

if context.is_offline_mode():
    raise SystemExit("offline (--sql) mode is not supported: run the command against a database")

if connection is not None:
    # transactional_ddl: true of both engines as storage drives them (on SQLite it issues BEGIN
    # itself), so Alembic's log says what happens; inside the caller's transaction Alembic opens
    # none of its own and committing is the caller's job
    context.configure(connection=connection, target_metadata=None, transactional_ddl=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    import logging.config

    from notifier import db, schema
    from notifier.config import load_settings, resolve_database_url

    if config.config_file_name is not None:
        logging.config.fileConfig(config.config_file_name)
    engine = db.make_engine(resolve_database_url(load_settings().database_url))
    try:
        with db.migration_transaction(engine) as conn:
            # the tables the code declares, so `alembic check` and --autogenerate compare against them
            context.configure(connection=conn, target_metadata=schema.metadata, transactional_ddl=True)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()
