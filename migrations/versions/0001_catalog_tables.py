"""Catalog tables: gpu, price (dated history), model (config JSON), budget_tier, catalog_meta.

Revision ID: 0001
Revises: 
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('budget_tier',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('slug', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('kind', sa.String(length=8), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('usd_min', sa.Float(), nullable=False),
    sa.Column('usd_max', sa.Float(), nullable=True),
    sa.Column('example_builds', sa.JSON(), nullable=False),
    sa.Column('good_for', sa.Text(), nullable=False),
    sa.Column('gpu_slugs', sa.JSON(), nullable=False),
    sa.Column('notes', sa.Text(), nullable=False),
    sa.Column('source', sa.Text(), nullable=False),
    sa.CheckConstraint("kind IN ('buy', 'rent')", name=op.f('ck_budget_tier_kind_known')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_budget_tier')),
    sa.UniqueConstraint('slug', name=op.f('uq_budget_tier_slug'))
    )
    op.create_table('catalog_meta',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('last_updated', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.Column('note', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_catalog_meta'))
    )
    op.create_table('gpu',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('slug', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('vendor', sa.String(length=32), nullable=False),
    sa.Column('architecture', sa.String(length=64), nullable=False),
    sa.Column('compute_capability', sa.String(length=16), nullable=False),
    sa.Column('platform', sa.String(length=16), nullable=False),
    sa.Column('vram_gb', sa.Float(), nullable=False),
    sa.Column('vram_total_mib', sa.Integer(), nullable=False),
    sa.Column('vram_total_source', sa.Text(), nullable=False),
    sa.Column('bandwidth_gbps', sa.Float(), nullable=False),
    sa.Column('bf16_tflops', sa.Float(), nullable=True),
    sa.Column('fp16_tflops', sa.Float(), nullable=False),
    sa.Column('bf16_supported', sa.Boolean(), nullable=False),
    sa.Column('measured_bf16_tflops', sa.Float(), nullable=True),
    sa.Column('board_power_w', sa.Float(), nullable=False),
    sa.Column('launch_price_usd', sa.Float(), nullable=True),
    sa.Column('consumer', sa.Boolean(), nullable=False),
    sa.Column('interconnect', sa.String(length=32), nullable=False),
    sa.Column('source', sa.Text(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint('fp16_tflops > 0', name=op.f('ck_gpu_fp16_positive')),
    sa.CheckConstraint('vram_total_mib > 0', name=op.f('ck_gpu_vram_positive')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_gpu')),
    sa.UniqueConstraint('slug', name=op.f('uq_gpu_slug'))
    )
    op.create_table('model',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('slug', sa.String(length=128), nullable=False),
    sa.Column('hf_id', sa.String(length=200), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('family', sa.String(length=64), nullable=False),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('params_total', sa.BigInteger(), nullable=False),
    sa.Column('params_active', sa.BigInteger(), nullable=False),
    sa.Column('license', sa.String(length=200), nullable=False),
    sa.Column('gated', sa.Boolean(), nullable=False),
    sa.Column('moe_experts', sa.Integer(), nullable=True),
    sa.Column('experts_per_token', sa.Integer(), nullable=True),
    sa.Column('source', sa.Text(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_model')),
    sa.UniqueConstraint('hf_id', name=op.f('uq_model_hf_id')),
    sa.UniqueConstraint('slug', name=op.f('uq_model_slug'))
    )
    op.create_table('price',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('gpu_id', sa.Integer(), nullable=False),
    sa.Column('provider', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('usd_per_gpu_hour', sa.Float(), nullable=False),
    sa.Column('observed_on', sa.Date(), nullable=False),
    sa.Column('source', sa.Text(), nullable=False),
    sa.Column('note', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("kind IN ('spot', 'on_demand', 'community', 'marketplace', 'serverless', 'reserved')", name=op.f('ck_price_kind_known')),
    sa.CheckConstraint("source <> ''", name=op.f('ck_price_source_present')),
    sa.CheckConstraint('usd_per_gpu_hour > 0', name=op.f('ck_price_usd_positive')),
    sa.ForeignKeyConstraint(['gpu_id'], ['gpu.id'], name=op.f('fk_price_gpu_id_gpu'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_price')),
    sa.UniqueConstraint('gpu_id', 'provider', 'kind', 'observed_on', name='uq_price_observation')
    )
    with op.batch_alter_table('price', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_price_gpu_id'), ['gpu_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('price', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_price_gpu_id'))

    op.drop_table('price')
    op.drop_table('model')
    op.drop_table('gpu')
    op.drop_table('catalog_meta')
    op.drop_table('budget_tier')
