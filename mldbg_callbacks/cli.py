"""``mldbg``: evaluate traces and look at results from a terminal.

    mldbg runs                              models, versions and their saved epochs
    mldbg evaluate MODEL VERSION [--n-epoch latest|all|N] [--result-name NAME] [--html report.html]
    mldbg results MODEL VERSION             saved results of a version
    mldbg show MODEL VERSION RESULT         the summary of one result
    mldbg select MODEL VERSION --budget N [--strategy S] [--dataset D] [--result NAME] [-o ids.txt]
                                            the ids to label or review next (DataFiltering)
    mldbg monitor MODEL VERSION [--window D|h] [--dataset D] [--result NAME]
                                            per-window shares and drift of data traced without labels
    mldbg report MODEL VERSION -o report.html [--result NAME]
                                            a self-contained HTML report (the newest result, or --result)
    mldbg ui [--port 8765]                  the web UI over a local store (loopback, no key; --expose: a key)
    mldbg serve [--host H] [--port P] [--db URL]
                                            the team server: REST API /v1 and web UI (extra [server])
    mldbg keys create --project P | list | revoke KEY_ID
                                            API keys of the server's database
    mldbg sync                              send uploads spooled while the server was unreachable

Every command takes ``--store DIR`` (default: MLD_HOME, else ./mldbg; for runs/evaluate/results/show/
report/select/monitor also a server URL, default MLD_API_ENDPOINT).
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

from .errors import MLDebuggerError


def _n_epoch(value: str) -> str | int | None:
    if value == "latest":
        return "latest"
    if value in ("all", "none", "None"):
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--n-epoch must be 'latest', 'all' or an epoch number, got {value!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mldbg", description="mldbg-callbacks: evaluate traced training runs")
    parser.add_argument("--store", default=None, help="store directory (default: MLD_HOME, else ./mldbg)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("runs", help="list models, versions and saved epochs")
    evaluate = commands.add_parser("evaluate", help="evaluate a model version and save the result")
    evaluate.add_argument("model_name")
    evaluate.add_argument("version_name")
    evaluate.add_argument("--n-epoch", type=_n_epoch, default="latest", help="'latest' (default), 'all' or N")
    evaluate.add_argument("--result-name", default=None)
    evaluate.add_argument("--risk", type=float, default=0.05, help="error rate tolerated among accepted predictions")
    evaluate.add_argument("--html", default=None, help="also write an HTML report to this path")
    results = commands.add_parser("results", help="list saved results of a model version")
    results.add_argument("model_name")
    results.add_argument("version_name")
    show = commands.add_parser("show", help="print the summary of a saved result")
    show.add_argument("model_name")
    show.add_argument("version_name")
    show.add_argument("result_name")
    report = commands.add_parser("report", help="write a self-contained HTML report of a saved result")
    report.add_argument("model_name")
    report.add_argument("version_name")
    report.add_argument("-o", "--output", default="report.html", help="where to write it (default report.html)")
    report.add_argument("--result", default=None, help="result name (default: the newest; evaluates if none)")
    select = commands.add_parser("select", help="the ids to label or review next, within a budget")
    select.add_argument("model_name")
    select.add_argument("version_name")
    select.add_argument("--budget", type=int, required=True, help="how many units to select")
    select.add_argument("--strategy", default="error_proba",
                        help="error_proba (default), entropy, margin, hotspot, diversity, review_labels or random")
    select.add_argument("--dataset", default=None, help="the pool's dataset_type (default: the one traced without "
                                                        "labels, else train)")
    select.add_argument("--result", default=None, help="result name (default: the newest; evaluates if none)")
    select.add_argument("-o", "--output", default=None, help="write the ids there, one per line (.csv: the table)")
    monitor = commands.add_parser("monitor", help="per-window shares and drift of data traced without labels")
    monitor.add_argument("model_name")
    monitor.add_argument("version_name")
    monitor.add_argument("--window", default="D", help="pandas frequency of the windows: D (default), h, 15min...")
    monitor.add_argument("--dataset", default=None, help="dataset_type traced without labels (if several)")
    monitor.add_argument("--baseline", default=None, help="labelled dataset_type to compare with (default: one "
                                                          "other than the reference set, e.g. val)")
    monitor.add_argument("--result", default=None, help="result name (default: the newest; evaluates if none)")
    ui = commands.add_parser("ui", help="serve the web UI over a local store (loopback only, no key)")
    ui.add_argument("--port", type=int, default=8765)
    ui.add_argument("--host", default="127.0.0.1", help="a loopback address unless --expose; to share runs with a "
                                                        "team use `mldbg serve`")
    ui.add_argument("--expose", action="store_true", help="allow a non-loopback --host; every request then needs a "
                                                          "key (MLD_UI_KEY, else one generated and printed)")
    serve = commands.add_parser("serve", help="run the team server (REST API under /v1 and the web UI)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 to accept other machines)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--db", default=None, help="metadata database URL (default: SQLite in the store; "
                                                  "postgresql://user@host/db for a team deployment)")
    serve.add_argument("--max-upload-mb", type=float, default=64.0, help="largest upload accepted (default 64)")
    keys = commands.add_parser("keys", help="manage the server's API keys")
    keys.add_argument("--db", default=None, help="as for `mldbg serve`")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="create a key for a project (printed once)")
    create.add_argument("--project", required=True)
    create.add_argument("--label", default="", help="a note to recognise the key by")
    listing = key_commands.add_parser("list", help="list keys (ids only, never the keys)")
    listing.add_argument("--project", default=None)
    revoke = key_commands.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")
    sync = commands.add_parser("sync", help="send the uploads spooled while the server was unreachable")
    sync.add_argument("--endpoint", default=None, help="server URL (default: MLD_API_ENDPOINT)")
    sync.add_argument("--spool", default=None, help="spool directory (default: MLD_SPOOL_DIR, else ~/.cache/...)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .evaluation.result import make_console

    console = make_console()
    try:
        return _run(args, console)
    except MLDebuggerError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 1


def _run(args: argparse.Namespace, console: Console) -> int:
    from .evaluation.result import dataframe_table
    from .evaluator import Evaluator
    from .store import resolve_store

    if args.command in ("ui", "serve", "keys"):
        from .server.cli import run_server_command

        return run_server_command(args, console)
    if args.command == "sync":
        return _sync(args, console)
    store = resolve_store(args.store)
    if args.command == "runs":
        import pandas as pd

        frames = [store.partitions_frame(m, v).assign(model_name=m, version_name=v)
                  for m in store.list_models() for v in store.list_versions(m)]
        if not frames:
            console.print(f"no traces in {store.root}")
            return 0
        frame = pd.concat(frames, ignore_index=True)
        console.print(dataframe_table(frame[["model_name", "version_name", *frame.columns[:-2]]], f"Runs in {store.root}"))
        return 0

    evaluator = Evaluator(args.model_name, args.version_name, store=store)
    if args.command == "evaluate":
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as bar:
            task = bar.add_task("reading traces", total=None)

            def progress(stage: str, done: int, total: int) -> None:
                bar.update(task, description=stage, completed=done, total=total)

            result = evaluator.request_evaluation(result_name=args.result_name, n_epoch=args.n_epoch,
                                                  risk=args.risk, progress=progress)
        result.get_summary()
        if args.html:
            console.print(f"report written to {result.to_html(args.html)}")
        return 0
    if args.command == "results":
        console.print(dataframe_table(evaluator.list_results().astype(str), f"Results of {args.model_name}/{args.version_name}"))
        return 0
    if args.command == "show":
        evaluator.get_result(args.result_name).get_summary()
        return 0
    result = _saved_result(evaluator, args.result, console)
    if args.command == "report":
        console.print(f"report of {result.result_name!r} written to {result.to_html(args.output)}")
        return 0
    if args.command == "select":
        try:
            selected = result.select(args.budget, args.strategy, dataset_type=args.dataset, output=args.output)
        except ValueError as exc:  # a bad budget, strategy or pool: a usage error, not a crash
            console.print(f"[red]error:[/red] {exc}")
            return 2
        console.print(dataframe_table(selected, f"{len(selected)} unit(s) selected by {args.strategy} "
                                                f"from result {result.result_name!r}"))
        if args.output:
            console.print(f"ids written to {args.output}")
        return 0
    if args.command == "monitor":
        try:
            windows = result.monitoring(args.window, dataset_type=args.dataset, baseline=args.baseline)
        except ValueError as exc:
            console.print(f"[red]error:[/red] {exc}")
            return 2
        shown = windows.drop(columns=["pred_distribution"]).astype({"window_start": str})
        console.print(dataframe_table(shown, f"Monitoring of result {result.result_name!r}"))
        drifted = int(windows["drift"].sum())
        console.print(f"{drifted} of {len(windows)} window(s) drift" if drifted else "no window drifts")
        return 0
    return 2


def _saved_result(evaluator, name: str | None, console: Console):
    """The result named ``name``, else the newest saved one, else a new evaluation of the newest epoch."""
    if name is not None:
        return evaluator.get_result(name)
    names = evaluator.list_results()["result_name"].tolist()
    if names:
        return evaluator.get_result(names[-1])
    console.print("no saved result yet: evaluating the newest epoch first")
    return evaluator.request_evaluation()


def _sync(args: argparse.Namespace, console: Console) -> int:
    import os

    from .store.remote import RemoteStore, sync_spool

    endpoint = args.endpoint or os.environ.get("MLD_API_ENDPOINT")
    if not endpoint:
        console.print("[red]error:[/red] name the server: --endpoint URL or MLD_API_ENDPOINT")
        return 2
    store = RemoteStore(endpoint, spool_dir=args.spool)
    before = len(store.spool.entries())
    report = sync_spool(store)
    console.print(f"sent {report.delivered} spooled upload(s) to {store.endpoint}; {report.remaining} still waiting "
                  f"in {store.spool.directory}" + (f" ({before} entries found)" if before else ""))
    for refused in report.refused:
        console.print(f"[yellow]refused, set aside in failed/:[/yellow] {refused}")
    return 1 if report.remaining or report.refused else 0


if __name__ == "__main__":
    sys.exit(main())
