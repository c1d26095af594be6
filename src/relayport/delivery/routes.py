"""HTTP routes (thin: parse, authorize, call the service)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
