"""The team server (`mldbg serve`) and the local web UI (`mldbg ui`): FastAPI, the extra ``[server]``.

    mldbg keys create --project vision          # prints a key once: mldbg_…
    mldbg serve --store /srv/mldbg --host 0.0.0.0 --port 8000 [--db postgresql://…]
    MLD_API_ENDPOINT=http://host:8000 MLD_API_KEY=mldbg_… python train.py

Nothing here is imported by ``import mldbg_callbacks`` or by the tracers: ``server.app`` (FastAPI) and
``server.db`` (SQLAlchemy) are imported by what uses them.
"""
