"""Drop the `meta` table: Alembic's alembic_version now records where the schema stands.

The first release kept schema_version=1 there; db.migrate() reads it once, to recognise a
database of that release, before this revision runs.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: Union[str, Sequence[str], None] = "0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Drop `meta`."""
    op.drop_table("meta")


def downgrade() -> None:
    """Bring `meta` back with the row the first release reads."""
    meta = op.create_table(
        "meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(255), nullable=False),
    )
    op.bulk_insert(meta, [{"key": "schema_version", "value": "1"}])
