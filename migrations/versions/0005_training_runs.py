"""training runs: checkpoints reported by runs, collected run output, restarts and lost time

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23

A preempted training run resumes from its latest checkpoint; the logs are what a user reads to
see why a run ended.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

BIGINT_PK = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('restarts', sa.Integer(), server_default='0', nullable=False))
        batch.add_column(sa.Column('lost_seconds', sa.Float(), server_default='0', nullable=False))
        batch.add_column(sa.Column('log_chars', sa.BigInteger(), server_default='0', nullable=False))
        batch.create_index('ix_jobs_use_reservation_id', ['use_reservation_id'], unique=False)
    op.create_table('job_checkpoints',
    sa.Column('id', BIGINT_PK, autoincrement=True, nullable=False),
    sa.Column('job_id', sa.Uuid(), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('step', sa.BigInteger(), nullable=False),
    sa.Column('uri', sa.Text(), nullable=False),
    sa.Column('reported_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_job_checkpoints_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_job_checkpoints')),
    sa.UniqueConstraint('job_id', 'step', name=op.f('uq_job_checkpoints_job_id_step'))
    )
    op.create_table('job_logs',
    sa.Column('id', BIGINT_PK, autoincrement=True, nullable=False),
    sa.Column('job_id', sa.Uuid(), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('stream', sa.String(length=8), nullable=False),
    sa.Column('text', sa.Text(), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_job_logs_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_job_logs'))
    )
    op.create_index('ix_job_logs_job_id_id', 'job_logs', ['job_id', 'id'], unique=False)
    op.create_index('ix_job_logs_at', 'job_logs', ['at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_job_logs_at', table_name='job_logs')
    op.drop_index('ix_job_logs_job_id_id', table_name='job_logs')
    op.drop_table('job_logs')
    op.drop_table('job_checkpoints')
    with op.batch_alter_table('jobs') as batch:
        batch.drop_index('ix_jobs_use_reservation_id')
        batch.drop_column('log_chars')
        batch.drop_column('lost_seconds')
        batch.drop_column('restarts')
