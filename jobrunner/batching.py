"""Batch planner: (row index, estimated length, image key[, room]) in, lists of row indices out;
and ``joining``, how many planned rows join a running batch (continuous batching).

Pure functions of their inputs — no files, no model — so plans are deterministic and testable.

The planner reads ``sort_window`` rows at a time, sorts them by estimated length (longest first;
ties keep input order), rows sharing an image as one group (below), and cuts the sorted run
greedily into batches with at most ``batch_size`` rows and at most ``max_batch_tokens`` slots,
padding counted: ``len(batch) * longest_in_batch``. A row longer than the whole budget still forms
a batch of its own, so no row is ever dropped.

Rows with the same image key (several prompts over one image) stay together: the window is sorted
as groups, by each group's longest row, and a group's rows follow each other longest first (so a
batch's rows are longest first only within each group). The engine then finds the image's features
and prompt prefix still cached when the group's next row runs, where a plain length sort scatters
the rows of one image across the window and a cache that holds a few real-size prefixes has evicted
them by then. The price is padding: a group's rows differ in length by their text alone. Rows whose
key is ``None`` are groups of one, so a dataset without shared images is planned exactly as a plain
sort would.

Why longest first: padding is the same either way (it only depends on which rows share a batch),
but the window's longest row then runs in its first batch, so a budget that does not fit in
memory fails within seconds instead of hours into the job. Each window ends with its own (possibly
short) batch rather than carrying rows into the next window, so a batch never waits on rows
read far later. A window holds at least ``batch_size`` rows (else no batch could fill);
``sort_window == 1`` keeps input order (no sorting, no grouping).

The lengths are whatever the caller wants bounded (the runner's: prompt tokens, which bound
prefill padding). A row may also carry its room, the most tokens it may generate; ``fits`` then
bounds a batch by its rows, its longest row and its most room (the runner's: its KV cache).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from itertools import islice


def plan_batches(
    items: Iterable[tuple[int, int, Hashable | None] | tuple[int, int, Hashable | None, int]],
    batch_size: int,
    max_batch_tokens: int,
    sort_window: int,
    fits: Callable[[int, int, int | None], bool] | None = None,
) -> Iterator[list[int]]:
    """Group rows into length-sorted batches, streaming window by window.

    Args:
        items: ``(index, estimated_length, image_key)`` per row, in input order, or with a
            fourth element, the row's ``room`` (the most tokens it may generate); read lazily.
            Rows with equal non-None keys are kept together; ``None`` shares with no row.
        batch_size: most rows per batch (>= 1).
        max_batch_tokens: most padded slots per batch (>= 1).
        sort_window: rows sorted together (>= 1; at least ``batch_size`` are read per window).
        fits: ``fits(rows, longest, room)``, a further bound on a batch of ``rows`` rows whose
            longest has ``longest`` tokens and whose rows may generate at most ``room`` tokens
            (None where the items carry no room) (the runner's: its KV cache fits in memory).
            A row alone is never refused.

    Returns:
        An iterator of batches, each a list of row indices; the window's first batch holds its
        longest row. Every index of ``items`` appears in exactly one batch.
    """
    if batch_size < 1 or max_batch_tokens < 1 or sort_window < 1:
        raise ValueError("batch_size, max_batch_tokens and sort_window must all be >= 1")
    rows = iter(items)
    # A window shorter than a batch would cap every batch at the window size.
    while window := [_with_room(item) for item in islice(rows, max(sort_window, batch_size))]:
        triples = [(index, length, room) for index, length, _, room in window]
        if sort_window > 1:
            triples = _grouped_order(window)
        yield from _cut(triples, batch_size, max_batch_tokens, fits)


def _with_room(item: tuple) -> tuple[int, int, Hashable | None, int | None]:
    return (*item, None) if len(item) == 3 else item


_Row = tuple[int, int, int | None]  # index, length, room


def _grouped_order(window: Sequence[tuple[int, int, Hashable | None, int | None]]) -> list[_Row]:
    """The window's rows, groups by their longest row and rows within a group longest first;
    both sorts are stable, so ties keep input order."""
    groups: dict[Hashable, list[_Row]] = {}
    for position, (index, length, key, room) in enumerate(window):
        # a keyless row is a group of its own; positions cannot equal a caller's key
        group = groups.setdefault(_Alone(position) if key is None else key, [])
        group.append((index, length, room))
    ordered = sorted(groups.values(), key=lambda group: -max(row[1] for row in group))
    return [row for group in ordered for row in sorted(group, key=lambda row: -row[1])]


@dataclasses.dataclass(frozen=True)
class _Alone:
    position: int


def _cut(
    window: Sequence[_Row],
    batch_size: int,
    max_batch_tokens: int,
    fits: Callable[[int, int, int | None], bool] | None = None,
) -> Iterator[list[int]]:
    batch: list[int] = []
    longest, most = 0, 0
    for index, length, room in window:
        widest, roomiest = max(longest, length), _larger(most, room)
        rows = len(batch) + 1
        if batch and (
            rows > batch_size
            or rows * widest > max_batch_tokens
            or (fits is not None and not fits(rows, widest, roomiest))
        ):
            yield batch
            batch, widest, roomiest = [], length, room
        batch.append(index)
        longest, most = widest, roomiest
    if batch:
        yield batch


def _larger(a: int | None, b: int | None) -> int | None:
    """The larger room; None (a row without one: the caller's default, the largest) wins."""
    return None if a is None or b is None else max(a, b)


# Rows join a running batch once this share of its slots is free (fewer, larger joins).
JOIN_AT = 0.25


def joining(
    running: int,
    longest: int,
    longest_prompt: int,
    room: int,
    waiting: Iterable[tuple[int, int]],
    max_batch_tokens: int,
    fits: Callable[[int, int, int | None], bool] | None = None,
) -> int:
    """How many of the next rows join a running batch (continuous batching): the first
    ``waiting`` rows that keep the batch within ``max_batch_tokens`` prompt slots (every row
    padded to the longest prompt, as ``_cut`` counts them) and, with ``fits``, within memory.
    A row alone is never refused.

    Args:
        running: rows in the batch still generating.
        longest: positions the longest of them holds (prompt and tokens so far).
        longest_prompt: prompt tokens of the longest prompt among them.
        room: the most tokens any of them may still generate.
        waiting: ``(prompt length, room)`` of each next row in plan order, the free slots'
            worth; its room is the most tokens it may generate.
        fits: ``fits(rows, longest, room)`` as in ``plan_batches``, for the batch with the rows
            taken so far.

    Returns:
        How many of ``waiting``'s first rows join.
    """
    rows, take = running, 0
    widest, prompt, most = longest, longest_prompt, room
    for length, row_room in waiting:
        widest, prompt, most = max(widest, length), max(prompt, length), max(most, row_room)
        rows += 1
        over = rows * prompt > max_batch_tokens
        if rows > 1 and (over or (fits is not None and not fits(rows, widest, most))):
            break
        take += 1
    return take


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
