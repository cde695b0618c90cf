"""Stores: where traces and results live. ``resolve_store`` turns the user's ``store=`` into one."""

from __future__ import annotations

import os

from ..errors import RemoteStoreNotAvailable
from .local import LocalStore, Partition, RunWriter
from .names import validate_name

__all__ = ["LocalStore", "Partition", "RunWriter", "resolve_store", "validate_name"]


def resolve_store(store: "str | os.PathLike | LocalStore | None" = None) -> LocalStore:
    """``store=None``: the server named by MLD_API_ENDPOINT if set, else MLD_HOME, else ``./mldbg``.

    A path (or ``file://`` URL) is a LocalStore rooted there; an ``http(s)://`` URL is a server.
    """
    if isinstance(store, LocalStore):
        return store
    if store is None:
        endpoint = os.environ.get("MLD_API_ENDPOINT")
        if endpoint:
            _remote(endpoint)
        store = os.environ.get("MLD_HOME") or "./mldbg"
    store = os.fspath(store)
    if store.startswith(("http://", "https://")):
        _remote(store)
    if store.startswith("file://"):
        store = store[len("file://"):]
    return LocalStore(store)


def _remote(endpoint: str) -> None:
    raise RemoteStoreNotAvailable(
        f"MLD_API_ENDPOINT / store={endpoint!r} selects a team server, but remote tracing over HTTP "
        "(HttpSink and `mldbg serve`) is not part of this version yet. Unset MLD_API_ENDPOINT (and "
        "MLD_API_KEY) to use the embedded local store, optionally with MLD_HOME=<directory>."
    )
