"""The human-feedback web app: people label the policy's samples in a browser; labels land in a database.

    rlhflab label init --db sqlite:///labels.db        create or migrate the database (Alembic)
    rlhflab label add-user NAME [--admin]              print the user's login token (stored hashed)
    rlhflab label push --project P --policy DIR ...    sample K responses per prompt, queue the items
    rlhflab label serve --db URL                       the web app and its JSON API (uvicorn)
    rlhflab label stats / export                       agreement, position bias; pairs/rankings/... JSONL

Modules: `db` (tables, engines, migrations), `payloads` (what a label of each kind may hold), `store` (every
read and write the app and the CLI make, in transactions), `app` (the ASGI app: pages and API), `agreement`
(inter-annotator statistics), `export` (the foundation's record formats), `feedback` (a feedback source the
online loop asks, answered by people), `push` (sampling a policy's responses). Only `push` and `feedback`
import torch; the server does not.
"""
