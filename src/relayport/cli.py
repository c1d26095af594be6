"""The `relayport` command: serve | worker | migrate | admin …"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer
import uvloop
from pydantic import ValidationError

from relayport.core.errors import Problem
from relayport.settings import Settings

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Relayport event plumbing.",
)
admin = typer.Typer(no_args_is_help=True, help="Create tenants, users and API keys.")
app.add_typer(admin, name="admin")

T = TypeVar("T")


def settings_error_line(exc: ValidationError) -> str:
    """One line naming the first bad setting, in environment-variable terms."""
    err = exc.errors()[0]
    loc = "__".join(str(p) for p in err.get("loc", ()) if p != "__root__")
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    where = f"RELAYPORT_{loc.upper()}: " if loc else ""
    count = len(exc.errors())
    more = f" (and {count - 1} more)" if count > 1 else ""
    return f"invalid settings: {where}{msg}{more}"


def load_settings(**overrides: Any) -> Settings:
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        typer.echo(settings_error_line(exc), err=True)
        raise typer.Exit(2) from None


def _run(coro: Callable[[], Awaitable[T]]) -> T:
    try:
        # uvloop, as `serve` uses: the worker's hot loops (claims, sends, outcomes) gain most.
        return uvloop.run(coro())  # type: ignore[arg-type]
    except (ValueError, OSError) as exc:  # configuration problems found while connecting
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address.")] = None,
    port: Annotated[int | None, typer.Option(help="Port.")] = None,
    workers: Annotated[int | None, typer.Option(help="Server processes.")] = None,
) -> None:
    """Run the API (and, with the in-process broker, the worker inside it)."""
    import uvicorn

    from relayport.core.telemetry import configure_logging, uvicorn_log_config

    settings = load_settings(host=host, port=port, workers=workers)
    configure_logging(settings.telemetry)
    if settings.should_auto_migrate:
        # Migrate once here so several server processes don't all try at start.
        from relayport.core import migrate
        from relayport.core.db import Database

        async def run_migrations() -> None:
            db = Database(settings.database_url)
            try:
                await migrate.upgrade(db)
            finally:
                await db.dispose()

        _run(run_migrations)
    # Uvicorn drains on SIGTERM and then re-raises the signal to the previous handler: make
    # that handler a clean exit, so an orderly stop exits 0 as process supervisors expect.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(0))
    uvicorn.run(
        "relayport.app:create_app_from_env",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_config=uvicorn_log_config(settings.telemetry),
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
        proxy_headers=False,  # client IPs come from our own trusted-proxy rule
        server_header=False,
        loop="uvloop",
        # uvicorn's httptools and sans-I/O WebSocket protocols, plus an ASGI scope extension
        # that lets live-configuration streams write pre-framed events to their sockets.
        http="relayport.configs.wire:WireHttpProtocol",
        ws="relayport.configs.wire:WireWebSocketProtocol",
    )


@app.command()
def worker() -> None:
    """Run the background worker: outbox relay and job consumers. Stops cleanly on SIGTERM."""
    from relayport.core.telemetry import configure_logging
    from relayport.runtime import build_platform, close_platform
    from relayport.worker import Worker

    settings = load_settings()
    configure_logging(settings.telemetry)

    async def main() -> None:
        platform = await build_platform(settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        runner = Worker(platform)
        await runner.start()
        try:
            await stop.wait()
        finally:
            await runner.stop(settings.shutdown_timeout_s)
            await close_platform(platform)

    _run(main)


@app.command()
def migrate(
    revision: Annotated[str, typer.Option(help="Target revision.")] = "head",
) -> None:
    """Apply database migrations (safe to run from several machines at once)."""
    from relayport.core import migrate as migrations
    from relayport.core.db import Database

    settings = load_settings()

    async def main() -> tuple[str | None, str | None]:
        db = Database(settings.database_url)
        try:
            return await migrations.upgrade(db, revision)
        finally:
            await db.dispose()

    before, after = _run(main)
    typer.echo(f"database at {after} (was {before})")


def _with_session(fn: Callable[[Any], Awaitable[T]]) -> T:
    from relayport.runtime import build_platform, close_platform

    settings = load_settings()

    async def main() -> T:
        platform = await build_platform(settings)
        try:
            async with platform.db.transaction() as session:
                return await fn(session)
        finally:
            await close_platform(platform)

    try:
        return _run(main)
    except Problem as exc:
        typer.echo(f"error: {exc.detail or exc.title}", err=True)
        raise typer.Exit(1) from None


@admin.command("create-tenant")
def create_tenant(
    name: Annotated[str, typer.Option(help="Tenant name.")],
    plan: Annotated[str, typer.Option(help="Plan: free, pro, enterprise.")] = "free",
) -> None:
    """Create a tenant and print its id."""
    from relayport.core.tenants import create_tenant as create

    settings = load_settings()
    if plan not in settings.ratelimit.plans:
        typer.echo(f"unknown plan {plan!r}", err=True)
        raise typer.Exit(2)

    async def run(session: Any) -> str:
        return (await create(session, name=name, plan=plan)).id

    typer.echo(_with_session(run))


@admin.command("create-user")
def create_user(
    tenant: Annotated[str, typer.Option(help="Tenant id.")],
    email: Annotated[str, typer.Option(help="Email.")],
    role: Annotated[str, typer.Option(help="viewer, operator or admin.")] = "admin",
    password: Annotated[
        str | None, typer.Option(help="Password (prompted when omitted).", envvar="")
    ] = None,
) -> None:
    """Create a user in a tenant and print its id."""
    from relayport.core.auth.models import ROLES, User
    from relayport.core.auth.passwords import hash_password
    from relayport.core.auth.service import normalize_email
    from relayport.core.db import utcnow
    from relayport.core.ids import new_id
    from relayport.core.tenants import get_tenant

    if role not in ROLES:
        typer.echo(f"unknown role {role!r}", err=True)
        raise typer.Exit(2)
    secret = password or getpass.getpass("password: ")
    if len(secret) < 10:
        typer.echo("password must have at least 10 characters", err=True)
        raise typer.Exit(2)

    async def run(session: Any) -> str:
        await get_tenant(session, tenant)
        user = User(
            id=new_id("usr"),
            tenant_id=tenant,
            email=normalize_email(email),
            password_hash=await hash_password(secret),
            role=role,
            is_active=True,
            created_at=utcnow(),
        )
        session.add(user)
        await session.flush()
        return user.id

    typer.echo(_with_session(run))


@admin.command("create-key")
def create_key(
    tenant: Annotated[str, typer.Option(help="Tenant id.")],
    name: Annotated[str, typer.Option(help="Key name.")],
    role: Annotated[str, typer.Option(help="viewer, operator or admin.")] = "admin",
    expires_in_s: Annotated[int | None, typer.Option(help="Lifetime in seconds.")] = None,
) -> None:
    """Create an API key and print it (shown only now)."""
    from relayport.core.auth.models import ROLES
    from relayport.core.auth.principal import Principal
    from relayport.core.auth.service import create_api_key
    from relayport.core.tenants import get_tenant

    if role not in ROLES:
        typer.echo(f"unknown role {role!r}", err=True)
        raise typer.Exit(2)

    async def run(session: Any) -> str:
        ten = await get_tenant(session, tenant)
        system = Principal("system", "system", ten.id, "admin", ten.plan)
        _, secret = await create_api_key(
            session, system, name=name, role=role, expires_in_s=expires_in_s, ip=None
        )
        return secret

    typer.echo(_with_session(run))


@admin.command("rewrap-secrets")
def rewrap_secrets(
    dry_run: Annotated[bool, typer.Option(help="Only count what needs re-wrapping.")] = False,
) -> None:
    """Re-wrap every stored secret's data key under the active master key (after a rotation)."""
    from relayport.core.crypto_rotation import pending_rewrap, rewrap_all
    from relayport.runtime import build_platform, close_platform

    settings = load_settings()

    async def run() -> list[str]:
        platform = await build_platform(settings)
        try:
            if dry_run:
                pending = await pending_rewrap(platform.db, platform.keyring)
                return [f"{col}: {n} pending" for col, n in pending.items()]
            report = await rewrap_all(platform.db, platform.keyring)
            return [
                f"{col}: scanned {c.scanned}, rewrapped {c.rewrapped}, skipped {c.skipped}, "
                f"failed {c.failed}"
                for col, c in report.columns.items()
            ]
        finally:
            await close_platform(platform)

    lines = _run(run)
    typer.echo("\n".join(lines) if lines else "no encrypted columns are registered")


def main() -> None:
    with contextlib.suppress(KeyboardInterrupt):
        app()
    sys.exit(0)


if __name__ == "__main__":
    main()
