"""Batch planner: (row index, estimated length) pairs in, lists of row indices out.

Pure functions of their inputs — no files, no model — so plans are deterministic and testable.

The planner reads ``sort_window`` rows at a time, sorts them by estimated length (longest first;
ties keep input order) and cuts the sorted run greedily into batches with at most ``batch_size``
rows and at most ``max_batch_tokens`` slots, padding counted: ``len(batch) * longest_in_batch``.
A row longer than the whole budget still forms a batch of its own, so no row is ever dropped.

Why longest first: padding is the same either way (it only depends on which rows share a batch),
but the heaviest batch of each window then runs first, so a budget that does not fit in memory
fails within seconds instead of hours into the job. Each window ends with its own (possibly
short) batch rather than carrying rows into the next window, so a batch never waits on rows
read far later. A window holds at least ``batch_size`` rows (else no batch could fill);
``sort_window == 1`` keeps input order (no sorting).

The lengths are whatever the caller wants bounded: prompt tokens bound prefill padding; adding
``max_tokens`` bounds the KV cache too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice


def plan_batches(
    items: Iterable[tuple[int, int]],
    batch_size: int,
    max_batch_tokens: int,
    sort_window: int,
) -> Iterator[list[int]]:
    """Group rows into length-sorted batches, streaming window by window.

    Args:
        items: ``(index, estimated_length)`` per row, in input order; read lazily.
        batch_size: most rows per batch (>= 1).
        max_batch_tokens: most padded slots per batch (>= 1).
        sort_window: rows sorted together (>= 1; at least ``batch_size`` are read per window).

    Returns:
        An iterator of batches, each a list of row indices, longest row first. Every index of
        ``items`` appears in exactly one batch.
    """
    if batch_size < 1 or max_batch_tokens < 1 or sort_window < 1:
        raise ValueError("batch_size, max_batch_tokens and sort_window must all be >= 1")
    rows = iter(items)
    # A window shorter than a batch would cap every batch at the window size.
    while window := list(islice(rows, max(sort_window, batch_size))):
        if sort_window > 1:
            window.sort(key=lambda item: -item[1])  # stable: equal lengths keep input order
        yield from _cut(window, batch_size, max_batch_tokens)


def _cut(
    window: Sequence[tuple[int, int]], batch_size: int, max_batch_tokens: int
) -> Iterator[list[int]]:
    batch: list[int] = []
    longest = 0
    for index, length in window:
        widest = max(longest, length)
        if batch and (len(batch) + 1 > batch_size or (len(batch) + 1) * widest > max_batch_tokens):
            yield batch
            batch, widest = [], length
        batch.append(index)
        longest = widest
    if batch:
        yield batch


def padding_fraction(batches: Iterable[Sequence[int]]) -> float:
    """Padded slots / all slots over batches given as lists of row lengths (0.0 when empty)."""
    stats = PlanStats()
    for lengths in batches:
        stats.add(lengths)
    return stats.padding_fraction


@dataclasses.dataclass
class PlanStats:
    """Running totals of the batches actually run, for progress lines and the summary."""

    batches: int = 0
    rows: int = 0
    tokens: int = 0  # real prompt tokens
    slots: int = 0  # tokens + padding: rows x longest, summed over batches

    def add(self, lengths: Sequence[int]) -> None:
        """Count one batch, given its rows' lengths."""
        if not lengths:
            return
        self.batches += 1
        self.rows += len(lengths)
        self.tokens += sum(lengths)
        self.slots += len(lengths) * max(lengths)

    @property
    def padding_fraction(self) -> float:
        return 0.0 if self.slots == 0 else (self.slots - self.tokens) / self.slots

    def to_dict(self) -> dict[str, float | int]:
        return {**dataclasses.asdict(self), "padding_fraction": self.padding_fraction}
