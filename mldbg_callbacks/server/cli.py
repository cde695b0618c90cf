"""``mldbg serve``, ``mldbg ui`` and ``mldbg keys``: the commands that need the extra ``[server]``."""

from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
import socket

from rich.console import Console


MIN_UI_KEY_CHARS = 32  # an exposed UI's key: 32 URL-safe characters are 192 random bits


def _store_dir(args: argparse.Namespace) -> str:
    return args.store or os.environ.get("MLD_HOME") or "./mldbg"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def run_server_command(args: argparse.Namespace, console: Console) -> int:
    try:
        from .app import ServerConfig
    except ImportError as exc:
        console.print(f"[red]error:[/red] `mldbg {args.command}` needs the server extra: "
                      f"pip install 'mldbg-callbacks[server]' ({exc})")
        return 2
    if args.command == "keys":
        from .db import Database

        db = Database(ServerConfig(store=_store_dir(args), db=args.db).database_url())
        if args.keys_command == "create":
            key = db.create_key(args.project, label=args.label)
            console.print(f"API key for project {args.project!r} (shown once, store it now):")
            print(key)
        elif args.keys_command == "list":
            for row in db.list_keys(args.project):
                state = f"revoked {row['revoked_at']:%Y-%m-%d}" if row["revoked_at"] else "active"
                console.print(f"{row['key_id']}  {row['project']}  {state}  {row['label']}")
        else:
            if not db.revoke_key(args.key_id):
                console.print(f"[red]error:[/red] no active key with id {args.key_id!r}")
                return 1
            console.print(f"key {args.key_id} revoked")
        return 0

    import uvicorn

    from .app import create_app

    if args.command == "ui":
        ui_key = None
        if args.expose:
            ui_key = os.environ.get("MLD_UI_KEY") or secrets.token_urlsafe(32)
            if len(ui_key) < MIN_UI_KEY_CHARS:
                console.print(f"[red]error:[/red] MLD_UI_KEY is too short to guard an exposed UI: use at least "
                              f"{MIN_UI_KEY_CHARS} random characters (e.g. `python -c 'import secrets; "
                              "print(secrets.token_urlsafe(32))'`), or unset it to get one generated")
                return 2
        elif not _is_loopback(args.host):
            console.print("[red]error:[/red] `mldbg ui` serves a store without keys, so it binds a loopback address "
                          "only; to expose it add --expose (every request then needs a key: MLD_UI_KEY, or the one "
                          "printed at start), or to share runs with a team run `mldbg serve` (API keys per project)")
            return 2
        config = ServerConfig(store=_store_dir(args), local=True, ui_key=ui_key)
        if ui_key is not None and "MLD_UI_KEY" not in os.environ:
            console.print("key of this UI (shown once; MLD_UI_KEY sets it):")  # short: never wrapped
            print(ui_key, flush=True)
    else:
        config = ServerConfig(store=_store_dir(args), db=args.db, max_chunk_bytes=int(args.max_upload_mb * (1 << 20)))
    app = create_app(config)
    console.print(f"mldbg {args.command}: store {app.state.server.root}, http://{args.host}:{args.port}/")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
