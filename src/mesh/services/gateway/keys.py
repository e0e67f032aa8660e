"""Command line for API keys: ``python -m mesh.services.gateway.keys create NAME | revoke ID_OR_NAME | list``.

Reads ``MESH_DATABASE_URL`` like the gateway; applies the gateway's migrations first, so it works on a
fresh database. ``create`` prints the key once; only its SHA-256 is stored.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import psycopg

from mesh.kit.db import create_pool
from mesh.kit.logging import configure_logging
from mesh.kit.settings import load_settings
from mesh.kit.text_fields import text_problem
from mesh.services.gateway.key_store import KeyStore, migrate
from mesh.services.gateway.settings import GatewaySettings

# A person waits at the prompt: a database that does not answer within this is reported, not waited for.
CONNECT_SECONDS = 5.0
MAX_NAME_CHARS = 200


def key_name(value: str) -> str:
    """A key's name: who or what it is for, so that it can be found and revoked by it later."""
    name = value.strip()
    problem = "is empty" if not name else text_problem(name, MAX_NAME_CHARS)
    if problem:
        raise argparse.ArgumentTypeError(f"the name {problem}; name who or what the key is for")
    return name


async def _run(args: argparse.Namespace, database_url: str) -> int:
    try:
        await migrate(database_url, timeout=CONNECT_SECONDS)
    except psycopg.OperationalError as error:
        print(
            f"PostgreSQL (MESH_DATABASE_URL) did not answer within {CONNECT_SECONDS:g} s: {error}".rstrip(),
            file=sys.stderr,
        )
        return 1
    async with create_pool(database_url, name="gateway-keys", min_size=1, max_size=1) as pool:
        store = KeyStore(pool)
        if args.command == "create":
            record, key = await store.create(args.name)
            print(json.dumps({"id": record.id, "name": record.name, "key": key}))
            print("store the key now: it cannot be shown again", file=sys.stderr)
            return 0
        if args.command == "revoke":
            count = await store.revoke(args.key)
            print(json.dumps({"revoked": count}))
            if count == 0:
                print(f"no active key has the id or name {args.key!r}", file=sys.stderr)
                return 1
            return 0
        for item in await store.list():
            print(
                json.dumps(
                    {
                        "id": item.id,
                        "name": item.name,
                        "prefix": item.prefix,
                        "created_at": item.created_at.isoformat(),
                        "revoked_at": item.revoked_at.isoformat() if item.revoked_at else None,
                    }
                )
            )
        return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run it; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m mesh.services.gateway.keys", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="create a key and print it once")
    create.add_argument("name", type=key_name, help="who or what the key is for")
    revoke = commands.add_parser("revoke", help="revoke a key by id, or every active key of a name")
    revoke.add_argument("key", help="the key's id or name")
    commands.add_parser("list", help="list keys (never the keys themselves)")
    args = parser.parse_args(argv)
    # Logs (the migrations applied on a first run) go to stderr: stdout carries only the answer, for scripts.
    configure_logging("gateway-keys", fmt="console")
    settings = load_settings(GatewaySettings)
    return asyncio.run(_run(args, settings.database_url))


if __name__ == "__main__":
    raise SystemExit(main())
