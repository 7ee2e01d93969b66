"""The schema's Alembic migrations: env.py and one file per revision in versions/.

Applied by notifier.db.migrate() at start-up (under a lock); see README.rst, "Migrations".
"""
