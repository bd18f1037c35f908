"""reservations budgets costs

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23

Reservations (rented capacity, recorded before the provider call), budgets and their monthly
ledgers, settled cost entries; jobs point at their current reservation and keep the
instance's callback report.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('budgets',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('scope', sa.String(length=16), nullable=False),
    sa.Column('scope_key', sa.String(length=100), nullable=False),
    sa.Column('monthly_limit', sa.Float(), nullable=True),
    sa.Column('hourly_limit', sa.Float(), nullable=True),
    sa.Column('rate_held', sa.Float(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_budgets')),
    sa.UniqueConstraint('scope', 'scope_key', name=op.f('uq_budgets_scope_scope_key'))
    )
    op.create_table('budget_periods',
    sa.Column('budget_id', sa.Uuid(), nullable=False),
    sa.Column('period', sa.String(length=7), nullable=False),
    sa.Column('spent', sa.Float(), nullable=False),
    sa.Column('held', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['budget_id'], ['budgets.id'], name=op.f('fk_budget_periods_budget_id_budgets'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('budget_id', 'period', name=op.f('pk_budget_periods'))
    )
    op.create_table('cost_entries',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('source', sa.String(length=200), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.Column('tenant_id', sa.Uuid(), nullable=True),
    sa.Column('job_id', sa.Uuid(), nullable=True),
    sa.Column('reservation_id', sa.Uuid(), nullable=True),
    sa.Column('provider', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('amount', sa.Float(), nullable=False),
    sa.Column('note', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_cost_entries_tenant_id_tenants'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_cost_entries')),
    sa.UniqueConstraint('source', name=op.f('uq_cost_entries_source'))
    )
    with op.batch_alter_table('cost_entries', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_cost_entries_at'), ['at'], unique=False)
        batch_op.create_index('ix_cost_entries_tenant_at', ['tenant_id', 'at'], unique=False)

    op.create_table('reservations',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('tenant_id', sa.Uuid(), nullable=False),
    sa.Column('job_id', sa.Uuid(), nullable=True),
    sa.Column('job_attempt', sa.Integer(), nullable=True),
    sa.Column('label', sa.String(length=100), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('provider', sa.String(length=64), nullable=True),
    sa.Column('offer_id', sa.String(length=200), nullable=True),
    sa.Column('offer', sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('external_id', sa.String(length=200), nullable=True),
    sa.Column('lease', sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('price_per_hour', sa.Float(), nullable=False),
    sa.Column('gpu', sa.String(length=100), nullable=True),
    sa.Column('gpu_count', sa.Integer(), nullable=False),
    sa.Column('request', sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('agent_token_hash', sa.String(length=64), nullable=True),
    sa.Column('duration_seconds', sa.Integer(), nullable=True),
    sa.Column('hold_amount', sa.Float(), nullable=False),
    sa.Column('held_on', sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('hold_period', sa.String(length=7), nullable=True),
    sa.Column('usage_cost', sa.Float(), nullable=False),
    sa.Column('cost', sa.Float(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('next_check_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.Column('active_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('released_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_reservations_job_id_jobs'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_reservations_tenant_id_tenants'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_reservations')),
    sa.UniqueConstraint('label', name=op.f('uq_reservations_label'))
    )
    with op.batch_alter_table('reservations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_reservations_job_id'), ['job_id'], unique=False)
        batch_op.create_index('ix_reservations_state_next_check', ['state', 'next_check_at'], unique=False)
        batch_op.create_index('ix_reservations_tenant_created', ['tenant_id', 'created_at'], unique=False)

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('reservation_id', sa.Uuid(), nullable=True))
        batch_op.add_column(sa.Column('use_reservation_id', sa.Uuid(), nullable=True))
        batch_op.add_column(sa.Column('report', sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), 'postgresql'), nullable=True))
        batch_op.add_column(sa.Column('callback_token_hash', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('claimed_at', sa.DateTime(timezone=True), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('claimed_at')
        batch_op.drop_column('callback_token_hash')
        batch_op.drop_column('report')
        batch_op.drop_column('use_reservation_id')
        batch_op.drop_column('reservation_id')

    with op.batch_alter_table('reservations', schema=None) as batch_op:
        batch_op.drop_index('ix_reservations_tenant_created')
        batch_op.drop_index('ix_reservations_state_next_check')
        batch_op.drop_index(batch_op.f('ix_reservations_job_id'))

    op.drop_table('reservations')
    with op.batch_alter_table('cost_entries', schema=None) as batch_op:
        batch_op.drop_index('ix_cost_entries_tenant_at')
        batch_op.drop_index(batch_op.f('ix_cost_entries_at'))

    op.drop_table('cost_entries')
    op.drop_table('budget_periods')
    op.drop_table('budgets')
