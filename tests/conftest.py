"""Shared fixtures: real PostgreSQL and Redis, each test run in its own database / DB index."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

POSTGRES_ADMIN_URL = os.environ.get(
    "BRAIN3D_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("BRAIN3D_TEST_REDIS", "redis://127.0.0.1:6379")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database, dropped afterwards."""
    from sqlalchemy import create_engine, text

    name = f"brain3d_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'brain3d.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request) -> str:
    """Both supported databases, so behaviour is shown to be the same on each."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A Redis DB index of its own (1-15, chosen at random), flushed before and after."""
    import random

    import redis

    index = random.randint(1, 15)
    url = f"{REDIS_URL}/{index}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


def require_tool(name: str) -> str:
    """The path of a required external tool; the test command installs them, so absence fails."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: run the README's test command, which installs it")
    return path
