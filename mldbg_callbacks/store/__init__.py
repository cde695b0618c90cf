"""Stores: where traces and results live. ``resolve_store`` turns the user's ``store=`` into one."""

from __future__ import annotations

import os

from .local import LocalStore, Partition, RunWriter
from .names import validate_name
from .remote import HttpSink, RemoteStore

__all__ = ["HttpSink", "LocalStore", "Partition", "RemoteStore", "RunWriter", "resolve_store", "validate_name"]


def resolve_store(store: "str | os.PathLike | LocalStore | RemoteStore | None" = None) -> "LocalStore | RemoteStore":
    """``store=None``: the server named by MLD_API_ENDPOINT if set, else MLD_HOME, else ``./mldbg``.

    A path (or ``file://`` URL) is a LocalStore rooted there; an ``http(s)://`` URL is a server, reached
    with the key in MLD_API_KEY.
    """
    if isinstance(store, (LocalStore, RemoteStore)):
        return store
    if store is None:
        endpoint = os.environ.get("MLD_API_ENDPOINT")
        if endpoint:
            return RemoteStore(endpoint)
        store = os.environ.get("MLD_HOME") or "./mldbg"
    store = os.fspath(store)
    if store.startswith(("http://", "https://")):
        return RemoteStore(store)
    if store.startswith("file://"):
        store = store[len("file://"):]
    return LocalStore(store)
