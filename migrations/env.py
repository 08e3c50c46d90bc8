"""Alembic environment for the syncer state database.

The URL comes from the caller (``syncer db upgrade`` passes it), else from settings.toml.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import URL

from syncer.db import comparison_options, create_state_engine
from syncer.models import Base
from syncer.settings import load_settings

config = context.config
if config.config_file_name is not None and "syncer_url" not in config.attributes:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _url() -> URL:
    given = config.attributes.get("syncer_url")
    if given is not None:
        assert isinstance(given, URL)
        return given
    return load_settings(None).database.url


def run_migrations_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=Base.metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_state_engine(_url())
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=Base.metadata,
                render_as_batch=True,
                **comparison_options(connection),
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
