"""distillation: teacher/student pairs, the model registry, traffic routes

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23

Pairs are indexed for streaming exports (time, model pair, acceptance); jobs point at the pair
they answer for.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

JSON = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), 'postgresql')


def upgrade() -> None:
    op.create_table('distillation_pairs',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('tenant_id', sa.Uuid(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('teacher_model', sa.String(length=200), nullable=False),
    sa.Column('student_model', sa.String(length=200), nullable=False),
    sa.Column('tags', JSON, nullable=False),
    sa.Column('messages', JSON, nullable=False),
    sa.Column('parent_job_id', sa.Uuid(), nullable=True),
    sa.Column('teacher_job_id', sa.Uuid(), nullable=True),
    sa.Column('student_job_id', sa.Uuid(), nullable=True),
    sa.Column('teacher_output', sa.Text(), nullable=True),
    sa.Column('student_output', sa.Text(), nullable=True),
    sa.Column('prompt_tokens', sa.Integer(), nullable=True),
    sa.Column('teacher_tokens', sa.Integer(), nullable=True),
    sa.Column('student_tokens', sa.Integer(), nullable=True),
    sa.Column('teacher_latency_ms', sa.Float(), nullable=True),
    sa.Column('student_latency_ms', sa.Float(), nullable=True),
    sa.Column('teacher_cost', sa.Float(), nullable=True),
    sa.Column('student_cost', sa.Float(), nullable=True),
    sa.Column('teacher_logprob', sa.Float(), nullable=True),
    sa.Column('score', sa.Float(), nullable=True),
    sa.Column('score_method', sa.String(length=16), nullable=True),
    sa.Column('agreement', sa.Float(), nullable=True),
    sa.Column('accepted', sa.Boolean(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_distillation_pairs_tenant_id_tenants'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_distillation_pairs'))
    )
    with op.batch_alter_table('distillation_pairs', schema=None) as batch_op:
        batch_op.create_index('ix_distillation_pairs_accepted_created', ['accepted', 'created_at'], unique=False)
        batch_op.create_index('ix_distillation_pairs_models_created', ['teacher_model', 'student_model', 'created_at'], unique=False)
        batch_op.create_index('ix_distillation_pairs_tenant_created', ['tenant_id', 'created_at'], unique=False)

    op.create_table('model_versions',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('tenant_id', sa.Uuid(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('stage', sa.String(length=16), nullable=False),
    sa.Column('artifact_uri', sa.String(length=2000), nullable=True),
    sa.Column('served_model', sa.String(length=200), nullable=True),
    sa.Column('metrics', JSON, nullable=False),
    sa.Column('params', JSON, nullable=False),
    sa.Column('training_job_id', sa.Uuid(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.Column('promoted_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_model_versions_tenant_id_tenants'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_model_versions')),
    sa.UniqueConstraint('tenant_id', 'name', 'version', name=op.f('uq_model_versions_tenant_id_name_version'))
    )
    op.create_table('traffic_routes',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('tenant_id', sa.Uuid(), nullable=False),
    sa.Column('teacher_model', sa.String(length=200), nullable=False),
    sa.Column('student_name', sa.String(length=200), nullable=False),
    sa.Column('share', sa.Float(), nullable=False),
    sa.Column('shadow_rate', sa.Float(), nullable=False),
    sa.Column('auto', sa.Boolean(), nullable=False),
    sa.Column('step', sa.Float(), nullable=False),
    sa.Column('max_share', sa.Float(), nullable=False),
    sa.Column('min_agreement', sa.Float(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_traffic_routes_tenant_id_tenants'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_traffic_routes')),
    sa.UniqueConstraint('tenant_id', 'teacher_model', name=op.f('uq_traffic_routes_tenant_id_teacher_model'))
    )
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('pair_id', sa.Uuid(), nullable=True))
        batch_op.add_column(sa.Column('pair_role', sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('pair_role')
        batch_op.drop_column('pair_id')
    op.drop_table('traffic_routes')
    op.drop_table('model_versions')
    with op.batch_alter_table('distillation_pairs', schema=None) as batch_op:
        batch_op.drop_index('ix_distillation_pairs_tenant_created')
        batch_op.drop_index('ix_distillation_pairs_models_created')
        batch_op.drop_index('ix_distillation_pairs_accepted_created')
    op.drop_table('distillation_pairs')
