"""Batch planner: bounds, completeness, padding and determinism."""

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobrunner.batching import PlanStats, joining, padding_fraction, plan_batches


def plan(lengths: list[int], batch_size: int, budget: int, window: int) -> list[list[int]]:
    items = [(i, length, None) for i, length in enumerate(lengths)]
    return list(plan_batches(items, batch_size, budget, window))


def batch_lengths(batches: list[list[int]], lengths: list[int]) -> list[list[int]]:
    return [[lengths[i] for i in batch] for batch in batches]


@settings(max_examples=300, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 5000), max_size=200),
    batch_size=st.integers(1, 16),
    budget=st.integers(1, 20000),
    window=st.integers(1, 64),
)
def test_bounds_and_every_index_once(
    lengths: list[int], batch_size: int, budget: int, window: int
) -> None:
    batches = plan(lengths, batch_size, budget, window)
    assert sorted(itertools.chain.from_iterable(batches)) == list(range(len(lengths)))
    for batch in batches:
        assert 1 <= len(batch) <= batch_size
        widest = max(lengths[i] for i in batch)
        # a single row over the budget still runs, alone
        assert len(batch) == 1 or len(batch) * widest <= budget
        # batches never mix rows of different windows (a window holds >= batch_size rows)
        assert len({i // max(window, batch_size) for i in batch}) == 1


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.integers(1, 100), min_size=1, max_size=100), window=st.integers(2, 50))
def test_windows_sorted_longest_first_ties_in_input_order(lengths: list[int], window: int) -> None:
    batches = plan(lengths, 2, 10**9, window)
    order = list(itertools.chain.from_iterable(batches))
    for start in range(0, len(lengths), window):
        chunk = order[start : start + window]
        assert chunk == sorted(range(start, start + len(chunk)), key=lambda i: (-lengths[i], i))


def test_sort_window_one_keeps_input_order() -> None:
    lengths = [5, 1, 9, 3, 4]
    assert plan(lengths, 2, 10**6, 1) == [[0, 1], [2, 3], [4]]
    assert plan(lengths, 4, 10**6, 1) == [[0, 1, 2, 3], [4]]
    assert plan(lengths, 4, 10**6, 2) == [[2, 0, 3, 1], [4]]  # window grows to batch_size


def test_greedy_cut_example() -> None:
    # sorted: 9(2) 7(5) 5(0) 3(3) 3(4) 1(1); budget 12 allows 1x9, 1x7, 2x5, 2x3
    assert plan([5, 1, 9, 3, 3, 7], 2, 12, 10) == [[2], [5], [0, 3], [4, 1]]


def test_row_longer_than_budget_runs_alone() -> None:
    assert plan([10, 500, 10], 8, 100, 8) == [[1], [0, 2]]


def mixed_lengths(n: int = 2000, seed: int = 0) -> list[int]:
    """Short text-only prompts mixed with long image prompts, as in real captioning data."""
    rng = random.Random(seed)
    return [rng.choice([rng.randint(20, 60), rng.randint(700, 2600)]) for _ in range(n)]


def test_sorting_reduces_padding_on_a_mixed_dataset() -> None:
    lengths = mixed_lengths()
    unsorted = padding_fraction(batch_lengths(plan(lengths, 8, 10**9, 1), lengths))
    windowed = padding_fraction(batch_lengths(plan(lengths, 8, 10**9, 256), lengths))
    assert unsorted > 0.4
    assert windowed < 0.05
    assert windowed < unsorted / 10


def test_plan_is_deterministic_and_lazy() -> None:
    lengths = mixed_lengths(500, seed=1)
    first = plan(lengths, 8, 8192, 64)
    assert first == plan(lengths, 8, 8192, 64)
    # streaming: batches come out while the input is still endless
    endless = ((i, 1 + i % 7, i % 3) for i in itertools.count())
    batches = plan_batches(endless, 4, 100, 16)
    assert sorted(itertools.chain.from_iterable(itertools.islice(batches, 4))) == list(range(16))


@pytest.mark.parametrize("bad", [{"batch_size": 0}, {"max_batch_tokens": 0}, {"sort_window": 0}])
def test_rejects_non_positive_parameters(bad: dict) -> None:
    params = {"batch_size": 1, "max_batch_tokens": 1, "sort_window": 1, **bad}
    with pytest.raises(ValueError):
        list(plan_batches([(0, 1, None)], **params))


def test_padding_fraction_and_stats() -> None:
    assert padding_fraction([]) == 0.0
    assert padding_fraction([[3, 3]]) == 0.0
    assert padding_fraction([[1, 3]]) == pytest.approx(2 / 6)
    assert padding_fraction([[1, 3], [2]]) == pytest.approx(2 / 8)
    stats = PlanStats()
    stats.add([1, 3])
    stats.add([])
    stats.add([2])
    assert (stats.batches, stats.rows, stats.tokens, stats.slots) == (2, 3, 6, 8)
    assert stats.to_dict()["padding_fraction"] == pytest.approx(0.25)


def grouped_plan(rows: list[tuple[int, str | None]], batch_size: int, window: int, budget=10**9):
    items = [(i, length, key) for i, (length, key) in enumerate(rows)]
    return list(plan_batches(items, batch_size, budget, window))


def test_rows_of_one_image_stay_together_groups_by_their_longest_row() -> None:
    # a plain sort would give 9(a) 8(b) 7(c) 6(a) 5(b) 4(-) 3(c)
    rows = [(6, "a"), (8, "b"), (3, "c"), (9, "a"), (4, None), (5, "b"), (7, "c")]
    assert grouped_plan(rows, 2, 16) == [[3, 0], [1, 5], [6, 2], [4]]
    # window 1: input order, no grouping
    assert grouped_plan(rows, 2, 1) == [[0, 1], [2, 3], [4, 5], [6]]


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.integers(1, 3000), st.one_of(st.none(), st.integers(0, 12))), max_size=120
    ),
    batch_size=st.integers(1, 12),
    window=st.integers(2, 50),
    budget=st.integers(1, 20000),
)
def test_groups_contiguous_within_windows(rows, batch_size: int, window: int, budget) -> None:
    batches = grouped_plan(rows, batch_size, window, budget)
    order = list(itertools.chain.from_iterable(batches))
    assert sorted(order) == list(range(len(rows)))
    for batch in batches:  # the bounds hold over the grouped order too
        assert 1 <= len(batch) <= batch_size
        assert len(batch) == 1 or len(batch) * max(rows[i][0] for i in batch) <= budget
    size = max(window, batch_size)
    for start in range(0, len(rows), size):
        chunk = order[start : start + size]
        assert sorted(chunk) == list(range(start, min(start + size, len(rows))))
        # a row without a key is a group of its own
        groups = [rows[i][1] if rows[i][1] is not None else ("alone", i) for i in chunk]
        runs = [
            [i for i, _ in run]
            for _, run in itertools.groupby(zip(chunk, groups, strict=True), key=lambda x: x[1])
        ]
        assert len(runs) == len(set(groups))  # each group is one run
        for run in runs:  # rows within a group longest first, ties in input order
            assert run == sorted(run, key=lambda i: (-rows[i][0], i))
        # groups by their longest row, longest first
        longest = [rows[run[0]][0] for run in runs]
        assert longest == sorted(longest, reverse=True)


def test_each_image_encoded_once_with_a_one_image_cache() -> None:
    """Shuffled rows, one to three prompts per image (the bench's shape, scaled up): with a
    cache that holds one image, a plain sort encodes far more images than there are; the
    grouped plan encodes each once."""
    rng = random.Random(0)
    rows = []
    for image in range(600):
        size = rng.choice([757, 1205, 1921, 2497])  # Phi-3.5-V image slots, 4-16 crops
        rows += [(size + rng.randint(10, 150), f"img{image}") for _ in range(rng.randint(1, 3))]
    rng.shuffle(rows)

    def encodes(batches: list[list[int]]) -> int:
        cached, count = None, 0
        for index in itertools.chain.from_iterable(batches):
            count += rows[index][1] != cached
            cached = rows[index][1]
        return count

    plain = plan([length for length, _ in rows], 8, 10**9, 4096)
    grouped = grouped_plan(rows, 8, 4096)
    assert encodes(grouped) == 600 < encodes(plain) * 0.6
    lengths = [length for length, _ in rows]
    assert padding_fraction(batch_lengths(grouped, lengths)) < 0.05


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 3000), max_size=80),
    batch_size=st.integers(1, 12),
    cap=st.integers(1, 20000),
    with_rooms=st.booleans(),
)
def test_fits_bounds_every_batch_of_several_rows(
    lengths, batch_size: int, cap: int, with_rooms: bool
) -> None:
    """``fits`` (the runner's KV-cache bound) holds for every batch but a row alone, counting
    the batch's most room when the items carry each row's (None when they do not)."""
    rooms = [1 + i * 37 % 500 for i in range(len(lengths))]

    def fits(rows: int, longest: int, room: int | None) -> bool:
        assert (room is None) != with_rooms
        return rows * (longest + (room or 100)) <= cap

    items = [(i, length, i % 3) for i, length in enumerate(lengths)]
    if with_rooms:
        items = [(*item, room) for item, room in zip(items, rooms, strict=True)]
    batches = list(plan_batches(items, batch_size, 10**9, 16, fits))
    assert sorted(itertools.chain.from_iterable(batches)) == list(range(len(lengths)))
    for batch in batches:
        room = max(rooms[i] for i in batch) if with_rooms else None
        assert len(batch) == 1 or fits(len(batch), max(lengths[i] for i in batch), room)


def test_a_row_without_a_room_gives_its_batch_the_callers_default() -> None:
    """Items without a room (the caller's default, its largest) are never outvoted by a
    smaller room of another row in the batch."""
    calls = []

    def fits(rows: int, longest: int, room: int | None) -> bool:
        calls.append(room)
        return True

    list(plan_batches([(0, 20, None, 8), (1, 20, None), (2, 10, None, 4)], 8, 10**6, 1, fits))
    assert calls == [None, None]


def test_joining_counts_the_room_of_running_and_joining_rows() -> None:
    """Rows join while the batch (running rows plus the rows taken so far) keeps within the
    prompt budget and ``fits``, which sees the longest row and the most room among them."""
    seen = []

    def fits(rows: int, longest: int, room: int | None) -> bool:
        seen.append((rows, longest, room))
        return rows * (longest + room) <= 1000

    # two rows running: longest 100 positions, 20 tokens still to come at most
    waiting = [(50, 30), (120, 10), (90, 400), (10, 5)]
    assert joining(2, 100, 80, 20, waiting, 10**6, fits) == 2
    assert seen == [(3, 100, 30), (4, 120, 30), (5, 120, 400)]
    assert joining(0, 0, 0, 0, [(5000, 900)], 10**6, fits) == 1  # a row alone is never refused
    assert joining(2, 100, 80, 20, waiting, 3 * 80, None) == 1  # 4 rows x 120 > 240 slots
