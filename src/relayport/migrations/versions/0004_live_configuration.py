"""live configuration (configs): projects, environments, versions, client keys

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24 17:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Versions are append-only in the storage layer, not only by convention in the code.
_PG_FUNCTION = """
CREATE FUNCTION config_versions_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'config_versions is append-only';
END;
$$ LANGUAGE plpgsql
"""


def _append_only_triggers() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_PG_FUNCTION)
        op.execute(
            "CREATE TRIGGER config_versions_append_only BEFORE UPDATE OR DELETE "
            "ON config_versions FOR EACH ROW EXECUTE FUNCTION config_versions_append_only()"
        )
        return
    for action in ("UPDATE", "DELETE"):
        op.execute(
            f"CREATE TRIGGER config_versions_no_{action.lower()} BEFORE {action} "
            "ON config_versions BEGIN SELECT RAISE(ABORT, 'config_versions is append-only'); END"
        )


def _drop_triggers() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS config_versions_append_only ON config_versions")
        op.execute("DROP FUNCTION IF EXISTS config_versions_append_only()")
        return
    for action in ("update", "delete"):
        op.execute(f"DROP TRIGGER IF EXISTS config_versions_no_{action}")


def upgrade() -> None:
    op.create_table(
        "config_projects",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_config_projects_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_config_projects")),
        sa.UniqueConstraint("tenant_id", "name", name=op.f("uq_config_projects_tenant_id")),
    )
    with op.batch_alter_table("config_projects", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_config_projects_tenant_id"), ["tenant_id"], unique=False
        )

    op.create_table(
        "config_environments",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("project_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("branched_from", sa.String(length=40), nullable=True),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("head_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["config_projects.id"],
            name=op.f("fk_config_environments_project_id_config_projects"),
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_config_environments_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_config_environments")),
        sa.UniqueConstraint("project_id", "name", name=op.f("uq_config_environments_project_id")),
    )
    with op.batch_alter_table("config_environments", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_config_environments_tenant_id"), ["tenant_id"], unique=False
        )

    op.create_table(
        "config_client_keys",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("environment_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("secrets", sa.Boolean(), nullable=False),
        sa.Column("created_by", sa.String(length=40), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["environment_id"],
            ["config_environments.id"],
            name=op.f("fk_config_client_keys_environment_id_config_environments"),
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_config_client_keys_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_config_client_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_config_client_keys_key_hash")),
    )
    with op.batch_alter_table("config_client_keys", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_config_client_keys_environment_id"), ["environment_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_config_client_keys_tenant_id"), ["tenant_id"], unique=False
        )

    op.create_table(
        "config_versions",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("environment_id", sa.String(length=40), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("document", sa.JSON(), nullable=False),
        sa.Column("schemas", sa.JSON(), nullable=False),
        sa.Column("secret_pointers", sa.JSON(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("changed_keys", sa.JSON(), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("previous_hash", sa.String(length=64), nullable=False),
        sa.Column("author_type", sa.String(length=16), nullable=False),
        sa.Column("author_id", sa.String(length=40), nullable=False),
        sa.Column("message", sa.String(length=1000), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["environment_id"],
            ["config_environments.id"],
            name=op.f("fk_config_versions_environment_id_config_environments"),
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_config_versions_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_config_versions")),
        sa.UniqueConstraint(
            "environment_id", "revision", name=op.f("uq_config_versions_environment_id")
        ),
    )
    with op.batch_alter_table("config_versions", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_config_versions_tenant_id"), ["tenant_id"], unique=False
        )

    op.create_table(
        "config_clients",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("environment_id", sa.String(length=40), nullable=False),
        sa.Column("client_key_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("transport", sa.String(length=16), nullable=False),
        sa.Column("connected", sa.Boolean(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=True),
        sa.Column("acked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["client_key_id"],
            ["config_client_keys.id"],
            name=op.f("fk_config_clients_client_key_id_config_client_keys"),
        ),
        sa.ForeignKeyConstraint(
            ["environment_id"],
            ["config_environments.id"],
            name=op.f("fk_config_clients_environment_id_config_environments"),
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_config_clients_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_config_clients")),
        sa.UniqueConstraint("client_key_id", "name", name=op.f("uq_config_clients_client_key_id")),
    )
    with op.batch_alter_table("config_clients", schema=None) as batch_op:
        batch_op.create_index(
            "ix_config_clients_environment_id_id", ["environment_id", "id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_config_clients_tenant_id"), ["tenant_id"], unique=False
        )

    op.create_table(
        "config_version_secrets",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("token", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["id"],
            ["config_versions.id"],
            name=op.f("fk_config_version_secrets_id_config_versions"),
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_config_version_secrets_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_config_version_secrets")),
    )
    with op.batch_alter_table("config_version_secrets", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_config_version_secrets_tenant_id"), ["tenant_id"], unique=False
        )

    op.create_table(
        "config_acks",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("environment_id", sa.String(length=40), nullable=False),
        sa.Column("client_id", sa.String(length=40), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("acked_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["client_id"],
            ["config_clients.id"],
            name=op.f("fk_config_acks_client_id_config_clients"),
        ),
        sa.ForeignKeyConstraint(
            ["environment_id"],
            ["config_environments.id"],
            name=op.f("fk_config_acks_environment_id_config_environments"),
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_config_acks_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_config_acks")),
        sa.UniqueConstraint("client_id", "revision", name=op.f("uq_config_acks_client_id")),
    )
    with op.batch_alter_table("config_acks", schema=None) as batch_op:
        batch_op.create_index(
            "ix_config_acks_environment_id_revision", ["environment_id", "revision"], unique=False
        )
    _append_only_triggers()


def downgrade() -> None:
    _drop_triggers()
    with op.batch_alter_table("config_acks", schema=None) as batch_op:
        batch_op.drop_index("ix_config_acks_environment_id_revision")

    op.drop_table("config_acks")
    with op.batch_alter_table("config_version_secrets", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_config_version_secrets_tenant_id"))

    op.drop_table("config_version_secrets")
    with op.batch_alter_table("config_clients", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_config_clients_tenant_id"))
        batch_op.drop_index("ix_config_clients_environment_id_id")

    op.drop_table("config_clients")
    with op.batch_alter_table("config_versions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_config_versions_tenant_id"))

    op.drop_table("config_versions")
    with op.batch_alter_table("config_client_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_config_client_keys_tenant_id"))
        batch_op.drop_index(batch_op.f("ix_config_client_keys_environment_id"))

    op.drop_table("config_client_keys")
    with op.batch_alter_table("config_environments", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_config_environments_tenant_id"))

    op.drop_table("config_environments")
    with op.batch_alter_table("config_projects", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_config_projects_tenant_id"))

    op.drop_table("config_projects")
