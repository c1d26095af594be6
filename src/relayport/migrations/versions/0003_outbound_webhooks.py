"""outbound webhooks (delivery): endpoints, event types, messages, deliveries, attempts

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 17:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "delivery_attempts",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("delivery_id", sa.String(length=40), nullable=False),
        sa.Column("message_id", sa.String(length=40), nullable=False),
        sa.Column("endpoint_id", sa.String(length=40), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("succeeded", sa.Boolean(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("error_class", sa.String(length=16), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("response_snippet", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_delivery_attempts")),
    )
    op.create_index(
        "ix_delivery_attempts_endpoint_id_id",
        "delivery_attempts",
        ["endpoint_id", "id"],
        unique=False,
    )
    op.create_index(
        "ix_delivery_attempts_message_id_id",
        "delivery_attempts",
        ["message_id", "id"],
        unique=False,
    )
    op.create_index(
        "ix_delivery_attempts_tenant_id_id", "delivery_attempts", ["tenant_id", "id"], unique=False
    )
    op.create_table(
        "delivery_endpoints",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("description", sa.String(length=500), nullable=False),
        sa.Column("filter_types", sa.JSON(), nullable=True),
        sa.Column("channels", sa.JSON(), nullable=True),
        sa.Column("headers", sa.JSON(), nullable=False),
        sa.Column("rate_limit_per_s", sa.Float(), nullable=True),
        sa.Column("fallback_urls", sa.JSON(), nullable=False),
        sa.Column("routing", sa.String(length=16), nullable=False),
        sa.Column("fifo", sa.Boolean(), nullable=False),
        sa.Column("retry_schedule_s", sa.JSON(), nullable=True),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("disabled_reason", sa.String(length=40), nullable=True),
        sa.Column("secrets_token", sa.Text(), nullable=False),
        sa.Column("secrets_meta", sa.JSON(), nullable=False),
        sa.Column("ed25519_public_key", sa.String(length=100), nullable=True),
        sa.Column("circuit_state", sa.String(length=16), nullable=False),
        sa.Column("circuit_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("failing_since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_delivery_endpoints_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_delivery_endpoints")),
    )
    op.create_index(
        "ix_delivery_endpoints_tenant_id_id",
        "delivery_endpoints",
        ["tenant_id", "id"],
        unique=False,
    )
    op.create_table(
        "delivery_event_types",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("description", sa.String(length=500), nullable=False),
        sa.Column("schema", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_delivery_event_types_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_delivery_event_types")),
        sa.UniqueConstraint("tenant_id", "name", name="uq_delivery_event_types_tenant_id_name"),
    )
    op.create_index(
        "ix_delivery_event_types_tenant_id_id",
        "delivery_event_types",
        ["tenant_id", "id"],
        unique=False,
    )
    op.create_table(
        "delivery_messages",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("event_type", sa.String(length=200), nullable=False),
        sa.Column("channels", sa.JSON(), nullable=True),
        sa.Column("idempotency_key", sa.String(length=200), nullable=True),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_delivery_messages_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_delivery_messages")),
        sa.UniqueConstraint(
            "tenant_id", "idempotency_key", name="uq_delivery_messages_tenant_id_idempotency_key"
        ),
    )
    op.create_index(
        "ix_delivery_messages_tenant_id_id", "delivery_messages", ["tenant_id", "id"], unique=False
    )
    op.create_table(
        "delivery_deliveries",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("message_id", sa.String(length=40), nullable=False),
        sa.Column("endpoint_id", sa.String(length=40), nullable=False),
        sa.Column("fifo", sa.Boolean(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("locked_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["endpoint_id"],
            ["delivery_endpoints.id"],
            name=op.f("fk_delivery_deliveries_endpoint_id_delivery_endpoints"),
        ),
        sa.ForeignKeyConstraint(
            ["message_id"],
            ["delivery_messages.id"],
            name=op.f("fk_delivery_deliveries_message_id_delivery_messages"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_delivery_deliveries")),
        sa.UniqueConstraint(
            "message_id", "endpoint_id", name="uq_delivery_deliveries_message_id_endpoint_id"
        ),
    )
    op.create_index(
        "ix_delivery_deliveries_endpoint_id_id",
        "delivery_deliveries",
        ["endpoint_id", "id"],
        unique=False,
    )
    op.create_index(
        "ix_delivery_deliveries_status_next_attempt_at",
        "delivery_deliveries",
        ["status", "next_attempt_at"],
        unique=False,
    )
    op.create_index(
        "ix_delivery_deliveries_tenant_id_id",
        "delivery_deliveries",
        ["tenant_id", "id"],
        unique=False,
    )

    op.create_table(
        "delivery_tenant_settings",
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("retry_schedule_s", sa.JSON(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_delivery_tenant_settings_tenant_id_tenants"),
        ),
        sa.PrimaryKeyConstraint("tenant_id", name=op.f("pk_delivery_tenant_settings")),
    )


def downgrade() -> None:
    op.drop_table("delivery_tenant_settings")
    op.drop_index("ix_delivery_deliveries_tenant_id_id", table_name="delivery_deliveries")
    op.drop_index("ix_delivery_deliveries_status_next_attempt_at", table_name="delivery_deliveries")
    op.drop_index("ix_delivery_deliveries_endpoint_id_id", table_name="delivery_deliveries")
    op.drop_table("delivery_deliveries")
    op.drop_index("ix_delivery_messages_tenant_id_id", table_name="delivery_messages")
    op.drop_table("delivery_messages")
    op.drop_index("ix_delivery_event_types_tenant_id_id", table_name="delivery_event_types")
    op.drop_table("delivery_event_types")
    op.drop_index("ix_delivery_endpoints_tenant_id_id", table_name="delivery_endpoints")
    op.drop_table("delivery_endpoints")
    op.drop_index("ix_delivery_attempts_tenant_id_id", table_name="delivery_attempts")
    op.drop_index("ix_delivery_attempts_message_id_id", table_name="delivery_attempts")
    op.drop_index("ix_delivery_attempts_endpoint_id_id", table_name="delivery_attempts")
    op.drop_table("delivery_attempts")
