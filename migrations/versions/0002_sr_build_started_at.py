"""Jobs record when building their SRs started, so a build that keeps killing its worker is
counted as an interrupted attempt like conversion and inference, and the job ends failed.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as jobs:
        jobs.add_column(sa.Column("sr_build_started_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # SQLite drops the column in place (3.35+): copying the table, as batch mode would, breaks
    # the foreign keys that point at jobs once rows exist.
    with op.batch_alter_table("jobs", recreate="never") as jobs:
        jobs.drop_column("sr_build_started_at")
