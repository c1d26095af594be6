"""inbound webhooks

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 15:50:12.887272
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "ingest_sources",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("scheme", sa.String(length=16), nullable=False),
        sa.Column("secrets_token", sa.Text(), nullable=False),
        sa.Column("secrets_meta", sa.JSON(), nullable=False),
        sa.Column("tolerance_s", sa.Integer(), nullable=False),
        sa.Column("body_limit_bytes", sa.Integer(), nullable=False),
        sa.Column("hmac_header", sa.String(length=100), nullable=True),
        sa.Column("hmac_algorithm", sa.String(length=16), nullable=True),
        sa.Column("hmac_encoding", sa.String(length=16), nullable=True),
        sa.Column("hmac_prefix", sa.String(length=40), nullable=True),
        sa.Column("hmac_timestamp_header", sa.String(length=100), nullable=True),
        sa.Column("type_pointer", sa.String(length=200), nullable=True),
        sa.Column("handler", sa.String(length=100), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_ingest_sources_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ingest_sources")),
    )
    op.create_index(
        "ix_ingest_sources_tenant_id_id", "ingest_sources", ["tenant_id", "id"], unique=False
    )
    op.create_table(
        "ingest_events",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("source_id", sa.String(length=40), nullable=False),
        sa.Column("dedup_key", sa.String(length=300), nullable=False),
        sa.Column("type", sa.String(length=200), nullable=False),
        sa.Column("subject", sa.String(length=200), nullable=True),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("headers", sa.JSON(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("duplicate_count", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["source_id"],
            ["ingest_sources.id"],
            name=op.f("fk_ingest_events_source_id_ingest_sources"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ingest_events")),
        sa.UniqueConstraint("source_id", "dedup_key", name="uq_ingest_events_source_id_dedup_key"),
    )
    op.create_index(
        "ix_ingest_events_source_id_received_at",
        "ingest_events",
        ["source_id", "received_at"],
        unique=False,
    )
    op.create_index(
        "ix_ingest_events_tenant_id_id", "ingest_events", ["tenant_id", "id"], unique=False
    )
    op.create_table(
        "ingest_rejections",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("source_id", sa.String(length=40), nullable=False),
        sa.Column("reason", sa.String(length=40), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("headers", sa.JSON(), nullable=False),
        sa.Column("body_prefix", sa.LargeBinary(), nullable=False),
        sa.Column("body_size", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["source_id"],
            ["ingest_sources.id"],
            name=op.f("fk_ingest_rejections_source_id_ingest_sources"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ingest_rejections")),
    )
    op.create_index(
        "ix_ingest_rejections_source_id_id", "ingest_rejections", ["source_id", "id"], unique=False
    )
    op.create_table(
        "ingest_jobs",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("source_id", sa.String(length=40), nullable=False),
        sa.Column("event_id", sa.String(length=40), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("locked_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["event_id"], ["ingest_events.id"], name=op.f("fk_ingest_jobs_event_id_ingest_events")
        ),
        sa.ForeignKeyConstraint(
            ["source_id"],
            ["ingest_sources.id"],
            name=op.f("fk_ingest_jobs_source_id_ingest_sources"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ingest_jobs")),
        sa.UniqueConstraint("event_id", name=op.f("uq_ingest_jobs_event_id")),
    )
    op.create_index("ix_ingest_jobs_source_id", "ingest_jobs", ["source_id"], unique=False)
    op.create_index(
        "ix_ingest_jobs_status_next_attempt_at",
        "ingest_jobs",
        ["status", "next_attempt_at"],
        unique=False,
    )
    op.create_index("ix_ingest_jobs_tenant_id_id", "ingest_jobs", ["tenant_id", "id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_ingest_jobs_tenant_id_id", table_name="ingest_jobs")
    op.drop_index("ix_ingest_jobs_status_next_attempt_at", table_name="ingest_jobs")
    op.drop_index("ix_ingest_jobs_source_id", table_name="ingest_jobs")
    op.drop_table("ingest_jobs")
    op.drop_index("ix_ingest_rejections_source_id_id", table_name="ingest_rejections")
    op.drop_table("ingest_rejections")
    op.drop_index("ix_ingest_events_tenant_id_id", table_name="ingest_events")
    op.drop_index("ix_ingest_events_source_id_received_at", table_name="ingest_events")
    op.drop_table("ingest_events")
    op.drop_index("ix_ingest_sources_tenant_id_id", table_name="ingest_sources")
    op.drop_table("ingest_sources")
