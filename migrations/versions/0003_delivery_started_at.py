"""Jobs record when the delivery attempt in progress started, so a delivery that keeps killing
its worker is counted as an interrupted attempt like every other step, and the job ends failed.
The column is cleared while a scheduled delivery retry waits: that wait is no interruption.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as jobs:
        jobs.add_column(sa.Column("delivery_started_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # SQLite drops the column in place (3.35+): copying the table, as batch mode would, breaks
    # the foreign keys that point at jobs once rows exist.
    with op.batch_alter_table("jobs", recreate="never") as jobs:
        jobs.drop_column("delivery_started_at")
