"""batch runs: name, kind, state, client idempotency key, output, estimate and options per batch

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26

A batch run is declared first and fed items in chunks, so a client that restarts finds its batch
again by key and re-sends chunks without creating anything twice; the estimate made before it
started is kept to be shown next to the actual cost and time.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

JSON = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), 'postgresql')


def upgrade() -> None:
    with op.batch_alter_table('batches') as batch:
        batch.add_column(sa.Column('name', sa.String(length=200), nullable=True))
        batch.add_column(sa.Column('kind', sa.String(length=32), server_default='jobs', nullable=False))
        batch.add_column(sa.Column('state', sa.String(length=16), server_default='open', nullable=False))
        batch.add_column(sa.Column('idempotency_key', sa.String(length=200), nullable=True))
        batch.add_column(sa.Column('output_uri', sa.Text(), nullable=True))
        batch.add_column(sa.Column('estimate', JSON, nullable=True))
        batch.add_column(sa.Column('options', JSON, nullable=True))
        batch.add_column(sa.Column('cancelled_at', sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False))
        batch.create_unique_constraint(batch.f('uq_batches_tenant_id_idempotency_key'), ['tenant_id', 'idempotency_key'])


def downgrade() -> None:
    with op.batch_alter_table('batches') as batch:
        batch.drop_constraint(batch.f('uq_batches_tenant_id_idempotency_key'), type_='unique')
        for column in ('updated_at', 'cancelled_at', 'options', 'estimate', 'output_uri', 'idempotency_key', 'state',
                       'kind', 'name'):
            batch.drop_column(column)
