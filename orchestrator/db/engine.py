"""Engine and sessions. SQLite (embedded default) gets WAL and a busy timeout so API,
workers and beat in separate processes can share one file."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Connection, CursorResult, Engine, Result, create_engine, delete, event, select
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.settings import get_settings


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            dbapi_conn.isolation_level = None  # let SQLAlchemy's BEGIN below take effect
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin_immediate(conn):  # type: ignore[no-untyped-def]
            # Take the write lock up front: avoids SQLITE_BUSY on read→write upgrades.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    # No pre-ping: it costs a round trip per transaction on the hot path. A connection killed by a
    # database restart fails one step, SQLAlchemy invalidates the pool, and the sweeper re-drives the job.
    return create_engine(url, pool_size=10, max_overflow=20, pool_recycle=1800)


@lru_cache(maxsize=4)
def get_engine(url: str | None = None) -> Engine:
    return make_engine(url or get_settings().database_url)


@lru_cache(maxsize=4)
def _sessionmaker(url: str | None) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A transaction: committed on success, rolled back on any error."""
    session = _sessionmaker(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


@contextmanager
def single_statement(url: str | None = None) -> Iterator[Connection]:
    """A connection for one self-contained statement: autocommit on Postgres (no BEGIN/COMMIT
    round trips), an ordinary transaction on SQLite."""
    engine = get_engine(url)
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            yield conn
    else:
        with engine.begin() as conn:
            yield conn


def reset_engines() -> None:
    """Forget cached engines (settings changed, or after fork)."""
    for factory in (_sessionmaker, get_engine):
        factory.cache_clear()


def rows_changed(result: Result[Any]) -> int:
    """Rows an UPDATE touched: 0 means a guard did not match (someone else moved the row first)."""
    return cast(CursorResult[Any], result).rowcount


def delete_in_batches(id_column: Any, *where: Any, batch: int = 1000) -> int:
    """Delete the rows matching ``where`` a batch per transaction (retention sweeps: the table is never
    locked for long); returns how many went."""
    table = id_column.class_
    deleted = 0
    while True:
        with session_scope() as s:
            ids = list(s.scalars(select(id_column).where(*where).limit(batch)))
            if ids:
                s.execute(delete(table).where(id_column.in_(ids)))
        deleted += len(ids)
        if len(ids) < batch:
            return deleted
