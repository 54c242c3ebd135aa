"""Where the state lives, as the config says it (`store:`): a SQLite file by default, a
PostgreSQL database when `store.url` is `postgresql://...`. Reading these settings loads no
database driver; `engine.store.open_store` opens the store they name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from engine import secrets
from engine.errors import ConfigError

DEFAULT_PATH = Path("state/engine.sqlite3")
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


@dataclass(frozen=True, slots=True)
class PostgresSettings:
    """A PostgreSQL store. The URL holds no password: it comes from `password_file`, else
    from the `${NAME}` reference in `password_reference`, else libpq finds it (PGPASSWORD,
    ~/.pgpass)."""

    url: str
    password_reference: str | None = None
    password_file: Path | None = None
    pool_size: int = 4
    # Threads for the dispatcher's store calls (`store.dispatch_threads`); None: `auto`.
    dispatch_threads: int | None = None

    def password(self) -> str | None:
        """The password, resolved now and registered as a secret (never logged)."""
        if self.password_file is not None:
            try:
                text = self.password_file.read_text(encoding="utf-8").strip()
            except OSError as error:
                raise ConfigError(
                    f"cannot read store.password_file {self.password_file}: {error.strerror}"
                ) from None
            return secrets.register(text)
        if self.password_reference is not None:
            try:
                return secrets.expand(self.password_reference)
            except secrets.MissingSecretError as error:
                raise ConfigError(f"no store password: {error}") from None
        return None


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """The store to open: `postgres` when set, else the SQLite file at `path`. `migrate`:
    whether opening it applies the schema steps it lacks (`store.migrate: auto`).
    `instance_id`: the cluster instance that opens it (named in PostgreSQL's
    `pg_stat_activity`); empty for a command."""

    path: Path = DEFAULT_PATH
    postgres: PostgresSettings | None = None
    migrate: bool = True
    instance_id: str = ""

    @property
    def where(self) -> str:
        """The store as shown to an operator (a URL holds no password)."""
        return self.postgres.url if self.postgres is not None else str(self.path)


def is_postgres_url(text: str) -> bool:
    return text.startswith(POSTGRES_SCHEMES)


def sqlite_path(text: str) -> str:
    """The file of `sqlite:PATH` (or of a plain path)."""
    return text.removeprefix("sqlite://").removeprefix("sqlite:")


def conninfo_fields(url: str) -> set[str]:
    """The connection parameters a PostgreSQL URL sets, read without loading the driver
    (ValueError when it cannot be one, e.g. a port that is not a number)."""
    parts = urlsplit(url)
    _ = parts.port  # ValueError when it is not a number
    fields = {name for name, _value in parse_qsl(parts.query)}
    if parts.password is not None:
        fields.add("password")
    return fields
