"""``mldbg serve``, ``mldbg ui`` and ``mldbg keys``: the commands that need the extra ``[server]``."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket

from rich.console import Console


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
        if not _is_loopback(args.host):
            console.print("[red]error:[/red] `mldbg ui` serves a store without keys, so it only binds a loopback "
                          "address; to share runs, run `mldbg serve` (API keys) instead")
            return 2
        config = ServerConfig(store=_store_dir(args), local=True)
    else:
        config = ServerConfig(store=_store_dir(args), db=args.db, max_chunk_bytes=int(args.max_upload_mb * (1 << 20)))
    app = create_app(config)
    console.print(f"mldbg {args.command}: store {app.state.server.root}, http://{args.host}:{args.port}/")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
