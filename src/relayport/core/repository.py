"""Tenant-scoped queries: the one place the tenant filter is built, so no query can forget it."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any, ClassVar, Generic, TypeVar

from sqlalchemy import FromClause, Select, bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession

from relayport.core.errors import BadRequest, NotFound
from relayport.core.fastread import DriverReads, Query
from relayport.core.paging import MAX_LIMIT

MAX_PAGE = MAX_LIMIT


M = TypeVar("M")


class Page(Generic[M]):
    """One page of a newest-first list; `next` is the cursor for the following page."""

    def __init__(self, items: Sequence[M], next_cursor: str | None) -> None:
        self.items = list(items)
        self.next = next_cursor


class TenantRepository(Generic[M]):
    """Base for repositories of rows that belong to a tenant.

    Ids are time-sortable, so `id` order is creation order and doubles as the cursor.
    """

    model: type[M]
    not_found_detail = "no such resource"

    def __init__(self, session: AsyncSession, tenant_id: str) -> None:
        self.session = session
        self.tenant_id = tenant_id

    def _cols(self) -> Any:
        return self.model

    def query(self) -> Select[M]:
        return select(self.model).where(self._cols().tenant_id == self.tenant_id)

    async def find(self, row_id: str) -> M | None:
        result = await self.session.execute(self.query().where(self._cols().id == row_id))
        return result.scalar_one_or_none()

    async def get(self, row_id: str) -> M:
        """The row, or 404 whether it is missing or another tenant's (never confirm existence)."""
        row = await self.find(row_id)
        if row is None:
            raise NotFound(self.not_found_detail)
        return row

    async def page(
        self, stmt: Select[M] | None = None, *, limit: int = 50, after: str | None = None
    ) -> Page[M]:
        _check_limit(limit)
        # Re-apply the tenant filter: a caller-built statement cannot widen the scope.
        stmt = (
            self.query() if stmt is None else stmt.where(self._cols().tenant_id == self.tenant_id)
        )
        if after:
            stmt = stmt.where(self._cols().id < after)
        stmt = stmt.order_by(self._cols().id.desc()).limit(limit + 1)
        return _page(list((await self.session.execute(stmt)).scalars()), limit)

    def add(self, row: M) -> M:
        self.session.add(row)
        return row


def _page(rows: list[Any], limit: int) -> Page[Any]:
    """The page from `limit + 1` rows fetched newest first: the extra row says there is more."""
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(rows, str(rows[-1].id) if more and rows else None)


def _check_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_PAGE:
        raise BadRequest(f"limit must be between 1 and {MAX_PAGE}", slug="invalid-limit")


class TenantReads:
    """The unfiltered page and the get-by-id of a tenant-owned table, on the driver.

    The same answers as `TenantRepository.page()` and `.get()`, for the hot GET routes: rows
    come back as read-only records (named tuples with the table's column names), not ORM
    objects. The tenant filter is part of every prebuilt statement.
    """

    # Every instance, so a test can compile each one for every dialect.
    registry: ClassVar[list[TenantReads]] = []

    def __init__(
        self,
        table: FromClause,
        *,
        exclude: Collection[str] = (),
        not_found_detail: str = "no such resource",
    ) -> None:
        cols = table.c
        unknown = set(exclude) - set(cols.keys())
        if unknown:
            raise ValueError(f"no such columns to exclude: {sorted(unknown)}")
        # Columns no answer shows (password hashes…) are not even read.
        shown = [c for c in cols if c.key not in exclude]
        scoped = select(*shown).where(cols.tenant_id == bindparam("tenant_id"))
        newest_first = cols.id.desc()
        self._first = Query(scoped.order_by(newest_first).limit(bindparam("limit")))
        self._after = Query(
            scoped.where(cols.id < bindparam("after"))
            .order_by(newest_first)
            .limit(bindparam("limit"))
        )
        self._one = Query(scoped.where(cols.id == bindparam("id")))
        self.not_found_detail = not_found_detail
        TenantReads.registry.append(self)

    def queries(self) -> list[Query]:
        return [self._first, self._after, self._one]

    async def page(
        self, reads: DriverReads, tenant_id: str, *, limit: int = 50, after: str | None = None
    ) -> Page[Any]:
        _check_limit(limit)
        if after:
            rows = await reads.all(self._after, tenant_id=tenant_id, after=after, limit=limit + 1)
        else:
            rows = await reads.all(self._first, tenant_id=tenant_id, limit=limit + 1)
        return _page(rows, limit)

    async def get(self, reads: DriverReads, tenant_id: str, row_id: str) -> Any:
        """The row, or 404 whether it is missing or another tenant's."""
        row = await reads.first(self._one, tenant_id=tenant_id, id=row_id)
        if row is None:
            raise NotFound(self.not_found_detail)
        return row
