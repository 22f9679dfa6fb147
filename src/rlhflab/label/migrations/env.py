"""Alembic environment of the labelling database: run by `rlhflab.label.db.init_db`, never by hand."""

from alembic import context

from rlhflab.label.db import Base, make_engine

config = context.config
engine = make_engine(config.get_main_option("sqlalchemy.url"))
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
