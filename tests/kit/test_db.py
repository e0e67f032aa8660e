"""Migrations (``mesh.kit.db.migrate``) against the real PostgreSQL."""

from __future__ import annotations

import asyncio

import psycopg

from mesh.kit.db import migrate


async def test_components_migrating_at_once_on_a_fresh_database_all_succeed(database_url: str) -> None:
    """Services starting together on an empty database (as `make up` does) each apply their migrations;
    none fails on the shared schema_migrations table being created by another at the same moment."""
    components = {
        "file": "mesh.services.file.migrations",
        "queue": "mesh.services.queue.migrations",
        "gateway": "mesh.services.gateway.migrations",
    }
    # Queue twice: image processing and inference both apply the queue's migrations when they start.
    runs = [*components.items(), ("queue", components["queue"])]
    applied = await asyncio.gather(*(migrate(database_url, name, package) for name, package in runs))
    assert all(isinstance(names, list) for names in applied)
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        rows = await (
            await conn.execute("SELECT component, count(*) FROM schema_migrations GROUP BY component")
        ).fetchall()
    assert {component for component, _ in rows} == set(components)
    assert sum(len(names) for names in applied) == sum(count for _, count in rows)
