"""provider health: the monitor's checks and circuit breaker per provider

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24

One row per provider, shared by every worker: placement reads these instead of asking each
provider before every job.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

JSON = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), 'postgresql')


def upgrade() -> None:
    op.create_table('provider_health',
    sa.Column('provider', sa.String(length=64), nullable=False),
    sa.Column('healthy', sa.Boolean(), nullable=False),
    sa.Column('breaker', sa.String(length=16), nullable=False),
    sa.Column('consecutive_failures', sa.Integer(), nullable=False),
    sa.Column('error_rate', sa.Float(), nullable=False),
    sa.Column('observations', sa.Integer(), nullable=False),
    sa.Column('latency_ewma_ms', sa.Float(), nullable=True),
    sa.Column('latency_samples', JSON, nullable=False),
    sa.Column('detail', sa.String(length=500), nullable=False),
    sa.Column('opened_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('checked_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.PrimaryKeyConstraint('provider', name=op.f('pk_provider_health'))
    )


def downgrade() -> None:
    op.drop_table('provider_health')
