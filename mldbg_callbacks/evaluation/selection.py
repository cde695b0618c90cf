"""Which (dataset_type, n_epoch) partitions an evaluation reads, and what it tells the user about them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..errors import NoTracesError
from ..store.local import Partition

EpochRequest = "str | int | None"


@dataclass
class Selection:
    """Epochs to evaluate per dataset_type, plus notes for the user (partial commits, fallbacks)."""

    epochs: dict[str, list[int]]
    notes: list[str] = field(default_factory=list)


def select_epochs(partitions: list[Partition], n_epoch: "str | int | None" = "latest") -> Selection:
    """Apply the epoch-selection rule of docs/analysis.md.

    ``"latest"``: per dataset_type the newest epoch whose ranks all committed (falling back to the
    newest partially committed one, with a note); an int: that epoch wherever it exists; ``None``:
    every epoch with committed data.
    """
    if not (n_epoch is None or n_epoch == "latest" or (isinstance(n_epoch, int) and not isinstance(n_epoch, bool))):
        raise ValueError(f"n_epoch must be 'latest', an int or None, got {n_epoch!r}")
    readable = [p for p in partitions if p.ranks_committed]
    if not readable:
        raise NoTracesError("no committed traces yet: call tracer.wait_for_save() after recording"
                            + (f" (found uncommitted epochs: {sorted({p.n_epoch for p in partitions})})"
                               if partitions else ""))
    by_dataset: dict[str, list[Partition]] = {}
    for partition in readable:
        by_dataset.setdefault(partition.dataset_type, []).append(partition)
    newest = {p.dataset_type: p for p in sorted(partitions, key=lambda p: p.n_epoch)}  # committed or not

    selection = Selection({})
    for dataset_type, parts in sorted(by_dataset.items()):
        parts = sorted(parts, key=lambda p: p.n_epoch)
        if n_epoch == "latest":
            complete = [p for p in parts if p.complete]
            chosen = [complete[-1]] if complete else [parts[-1]]
            if not complete:
                selection.notes.append(f"{dataset_type}: no epoch is completely saved; evaluating epoch "
                                       f"{parts[-1].n_epoch} with the ranks that committed")
            elif newest[dataset_type].n_epoch > chosen[0].n_epoch:  # a newer epoch lacks a rank (or every rank)
                selection.notes.append(
                    f"{dataset_type} epoch {newest[dataset_type].n_epoch} is not completely saved "
                    f"({_missing(newest[dataset_type])}); evaluating epoch {chosen[0].n_epoch}, the newest complete one")
        elif n_epoch is None:
            chosen = parts
        else:
            chosen = [p for p in parts if p.n_epoch == n_epoch]
        for partition in chosen:
            if not partition.complete:
                selection.notes.append(
                    f"{dataset_type} epoch {partition.n_epoch}: {len(partition.ranks_committed)} of "
                    f"{max(partition.world_size, len(partition.ranks_committed) + len(partition.ranks_pending))} "
                    f"ranks committed ({_missing(partition)}); evaluating what is committed")
        if chosen:
            selection.epochs[dataset_type] = [p.n_epoch for p in chosen]
    if not selection.epochs:
        available = sorted({p.n_epoch for p in readable})
        raise NoTracesError(f"n_epoch={n_epoch} has no committed traces; committed epochs: {available}")
    return selection


def _missing(partition: Partition) -> str:
    """Which ranks of a partially committed partition are missing, for the user's note ("missing rank 1")."""
    world = max(partition.world_size, max(partition.ranks_committed + partition.ranks_pending, default=-1) + 1)
    missing = sorted(set(range(world)) - set(partition.ranks_committed))
    label = "rank" if len(missing) == 1 else "ranks"
    stopped = [r for r in missing if r in partition.ranks_pending]
    text = f"missing {'rank' if len(missing) == 1 else 'ranks'} {', '.join(map(str, missing))}"
    if stopped == missing and len(missing) == 1:
        return text + ", which stopped mid-epoch and left only uncommitted parts"
    if stopped:
        return text + f"; {', '.join(map(str, stopped))} stopped mid-epoch and left only uncommitted parts"
    return text


def reference_key(committed: dict[str, list[int]], dataset_type: str, epoch: int,
                  note: Callable[[str], None]) -> tuple[str, int]:
    """The reference set of one evaluated (dataset_type, epoch): the ``train`` traces of that epoch, else the
    nearest earlier (or the first) train epoch, else the dataset itself; ``note`` tells the user which."""
    train = committed.get("train", [])
    if dataset_type == "train" or not train:
        if dataset_type != "train":
            note(f"{dataset_type}: no train traces, so {dataset_type} is its own reference set (each unit is left "
                 "out of what it is scored against)")
        return dataset_type, epoch
    earlier = [e for e in train if e <= epoch]
    chosen = earlier[-1] if earlier else train[0]
    if chosen != epoch:
        note(f"{dataset_type} epoch {epoch}: no train traces of that epoch; reference set is train epoch {chosen}")
    return "train", chosen
