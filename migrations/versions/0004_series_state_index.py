"""An index on series (state, spool_removed_at): the open series rebuilt at start and retention's
pass every minute over complete series whose spool is still there no longer read every series
the node ever received.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_series_state_spool_removed_at", "series", ["state", "spool_removed_at"])


def downgrade() -> None:
    op.drop_index("ix_series_state_spool_removed_at", table_name="series")
