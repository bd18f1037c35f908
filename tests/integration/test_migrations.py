"""The same Alembic migrations build the same schema on Postgres and on SQLite."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from orchestrator.db.engine import make_engine
from orchestrator.db.migrate import upgrade
from orchestrator.db.models import Base


def _diff(url: str) -> list[object]:
    engine = make_engine(url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    engine.dispose()
    return diff


def test_migrations_match_models_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url)
    upgrade(url)  # idempotent
    assert _diff(url) == []


def test_migrations_match_models_on_postgres(database_url: str) -> None:
    upgrade(database_url)
    assert _diff(database_url) == []
