"""Generation properties: batched == alone, cached == uncached, per-row sampling, stops."""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

import model.generate as generate_module
from model.cache import KVCache, make_cache
from model.generate import (
    LENGTH_BUCKET,
    Decoder,
    GenerationParams,
    _left_pad,
    chunk_sizes,
    decode_step,
    generate_batch,
    image_features,
    kv_positions,
    prefill,
    row_seed,
    static_shapes,
)
from model.language import attention_mask, position_ids
from model.loading import load


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load(str(tiny_model_dir))


def picture(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


MIXED_ROWS = [
    ("Describe the picture.", (60, 200)),  # portrait
    ("What colour is the circle in this image?", (300, 80)),  # landscape
    ("Caption.", (10, 7)),  # tiny
    ("Write one line about it.", (1500, 140)),  # huge and wide
    ("Tell me a story about a red square and a blue circle on a hill.", None),  # text only
    ("Hi", None),  # short text only
    ("Is it a square?", (56, 56)),  # exactly one crop
]


@pytest.fixture(scope="module")
def mixed_batch(loaded):
    _, processor = loaded
    return [
        processor.prepare(prompt, None if size is None else picture(*size, seed=i))
        for i, (prompt, size) in enumerate(MIXED_ROWS)
    ]


def test_batched_greedy_equals_each_row_alone(loaded, mixed_batch):
    model, processor = loaded
    params = GenerationParams(max_tokens=12)
    batched = generate_batch(model, processor, mixed_batch, params)
    lengths = {len(row.input_ids) for row in mixed_batch}
    assert len(lengths) >= 5  # really different prompt lengths
    for row, together in zip(mixed_batch, batched, strict=True):
        alone = generate_batch(model, processor, [row], params)[0]
        assert together.token_ids == alone.token_ids
        assert together.prompt_tokens == len(row.input_ids)
    # the rows do not all say the same thing (the test would be weak otherwise)
    assert len({tuple(r.token_ids) for r in batched}) > 1


def test_sampled_rows_do_not_depend_on_their_batch(loaded, mixed_batch):
    model, processor = loaded
    params = GenerationParams(max_tokens=10, temperature=0.9, top_p=0.95, top_k=50)
    seeds = [row_seed(7, f"row-{i}") for i in range(len(mixed_batch))]
    batched = generate_batch(model, processor, mixed_batch, params, seeds)
    order = [3, 0, 5]
    subset = generate_batch(
        model, processor, [mixed_batch[i] for i in order], params, [seeds[i] for i in order]
    )
    for i, result in zip(order, subset, strict=True):
        assert result.token_ids == batched[i].token_ids
    greedy = generate_batch(model, processor, mixed_batch, GenerationParams(max_tokens=10))
    assert any(s.token_ids != g.token_ids for s, g in zip(batched, greedy, strict=True))
    other_seed = generate_batch(model, processor, mixed_batch[:1], params, [seeds[0] + 1])
    reseeded = generate_batch(model, processor, mixed_batch[:1], params, [seeds[0]])
    assert reseeded[0].token_ids == batched[0].token_ids
    assert other_seed[0].token_ids != batched[0].token_ids


# float32 on the CPU agrees to rounding; a GPU runs the model in bfloat16 by default.
TOL = 1e-4 if mx.default_device() == mx.cpu else 2e-2


@pytest.mark.parametrize("static", [False, True], ids=["growing", "static"])
def test_cached_decoding_equals_full_recompute(loaded, mixed_batch, static):
    model, processor = loaded
    rows = [mixed_batch[0], mixed_batch[4], mixed_batch[2]]
    width = max(len(r.input_ids) for r in rows)
    ids = np.full((len(rows), width), processor.pad_token_id, dtype=np.int32)
    for b, row in enumerate(rows):
        ids[b, width - len(row.input_ids) :] = row.input_ids
    pad = mx.array([width - len(r.input_ids) for r in rows])
    features = image_features(model, rows)
    cache = make_cache(len(model.layers), static)
    logits = prefill(model, mx.array(ids), pad, cache, features, chunk=7)  # chunked prefill too
    sequence = mx.array(ids)
    for _ in range(6):
        length = sequence.shape[1]
        full = model(
            sequence,
            position_ids(pad, 0, length),
            attention_mask(pad, 0, length),
            image_features=features,
        )[:, -1]
        scale = float(mx.abs(full).max())
        assert float(mx.abs(logits - full).max()) <= TOL * scale
        token = mx.argmax(logits, axis=-1)
        sequence = mx.concatenate([sequence, token[:, None].astype(sequence.dtype)], axis=1)
        logits = decode_step(model, token, pad, cache)


def test_static_cache_shows_attention_what_it_returns():
    """``visible`` (the mask's width) always equals the keys ``update_and_fetch`` hands over:
    while the buffer holds, when it grows by a block, and after a later, larger reservation;
    a growing cache hands over whole ``KEY_BLOCK``s."""

    def write(cache, n):
        kv = mx.ones((2, 1, n, 4))
        end = cache.offset + n
        width = cache.visible(end)
        keys, values = cache.update_and_fetch(kv, kv)
        return width, keys.shape[2], values.shape[2]

    static = KVCache(static=True)
    static.reserve(100)
    assert write(static, 50) == (256, 256, 256)
    static.reserve(600)  # for the next allocation only
    assert write(static, 1) == (256, 256, 256)
    assert write(static, 300) == (768, 768, 768)  # grown: room for the reservation
    assert write(static, 1) == (768, 768, 768)
    growing = KVCache()  # in whole KEY_BLOCKs (16), the unwritten slots zeros
    assert write(growing, 5) == (16, 16, 16)
    assert write(growing, 300) == (320, 320, 320)
    assert write(growing, 15) == (320, 320, 320)
    assert float(growing.keys[..., 320:, :].abs().sum()) == 0.0


@pytest.mark.parametrize("row_prefill", [True, False], ids=["row-prefill", "batch-prefill"])
def test_static_shapes_change_no_output(loaded, mixed_batch, monkeypatch, row_prefill):
    """Bucketed prompt lengths and whole-buffer attention (the GPU default) give each row the
    tokens it gets without them, batched or alone, and attention then sees few shapes."""
    from model import ops

    model, processor = loaded
    base = GenerationParams(max_tokens=12, row_prefill=row_prefill, static_shapes=False)
    growing = generate_batch(model, processor, mixed_batch, base)
    seen = []
    attention = ops.attention

    def spy(q, k, v, *args, **kwargs):
        if kwargs.get("causal"):  # the decoder's, not the vision tower's
            seen.append((q.shape[2], k.shape[2]))
        return attention(q, k, v, *args, **kwargs)

    monkeypatch.setattr(ops, "attention", spy)
    params = replace(base, static_shapes=True)
    static = generate_batch(model, processor, mixed_batch, params)
    monkeypatch.undo()
    assert [r.token_ids for r in static] == [r.token_ids for r in growing]
    # the decoder's attention sees whole 256-position blocks, and every prompt's queries come
    # in multiples of the length bucket
    assert seen and all(keys % KVCache.step == 0 for _, keys in seen)
    assert all(queries == 1 or queries % LENGTH_BUCKET == 0 for queries, _ in seen)
    alone = generate_batch(model, processor, [mixed_batch[2]], params)[0]
    assert alone.token_ids == growing[2].token_ids
    ids, _ = _left_pad(mixed_batch, processor.pad_token_id, LENGTH_BUCKET)
    assert ids.shape[1] % LENGTH_BUCKET == 0
    cuda = mx.default_device() != mx.cpu and mx.cuda.is_available()
    assert static_shapes(GenerationParams()) == cuda


def test_vision_tower_sees_only_real_crops(loaded, mixed_batch):
    model, processor = loaded
    images = [image for row in mixed_batch for image in row.images]
    before = model.vision.crops_encoded
    image_features(model, mixed_batch)
    real = sum(1 + image.h_crop * image.w_crop for image in images)
    assert model.vision.crops_encoded - before == real
    assert real < len(images) * (processor.num_crops + 1)  # padding crops were skipped


@pytest.mark.parametrize("static", [False, True], ids=["growing", "static"])
def test_stop_token_ends_row_and_is_not_in_output(loaded, mixed_batch, static, monkeypatch):
    """A stopped row leaves the batch (the cache drops its row) and the others go on."""
    filtered = []
    keep_rows = generate_module.stack_rows

    def counting_filter(parts, width, reserve, static=False):
        filtered.append(
            sum(parts[0][0].keys.shape[0] if rows is None else rows.size for _, rows in parts)
        )
        return keep_rows(parts, width, reserve, static)

    monkeypatch.setattr(generate_module, "stack_rows", counting_filter)
    model, processor = loaded
    params = GenerationParams(max_tokens=8, static_shapes=static)
    free = generate_batch(model, processor, mixed_batch[:3], params)
    assert all(r.finish_reason == "length" and r.output_tokens == 8 for r in free)
    stop = free[1].token_ids[2]  # make row 1's third token a stop token
    original = set(processor.stop_token_ids)
    processor.stop_token_ids = original | {stop}
    try:
        stopped = generate_batch(model, processor, mixed_batch[:3], params)
    finally:
        processor.stop_token_ids = original
    first_stop = free[1].token_ids.index(stop)
    assert filtered and set(filtered) == {2}  # every layer's cache kept the other two rows
    assert stopped[1].finish_reason == "stop"
    assert stopped[1].token_ids == free[1].token_ids[:first_stop]
    assert stopped[1].output_tokens == first_stop
    assert stopped[1].text == processor.decode(free[1].token_ids[:first_stop])
    for i in (0, 2):  # the other rows go on as before, whether or not row 1 left the batch
        cut = free[i].token_ids.index(stop) if stop in free[i].token_ids else 8
        assert stopped[i].token_ids == free[i].token_ids[:cut]


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"static_shapes": True},
        {"row_prefill": False},
        {"temperature": 0.9, "top_k": 50},
    ],
    ids=["greedy", "static", "batched-prefill", "sampled"],
)
def test_rows_joining_a_running_batch_generate_what_they_would_alone(loaded, mixed_batch, settings):
    """Rows join the batch as others stop (continuous batching): each generates what it would
    alone, whether it joins shorter or longer rows mid-way, and the cache keeps no row that
    finished, nor positions that are padding in every row, once rows have joined."""
    model, processor = loaded
    params = GenerationParams(max_tokens=10, **settings)
    seeds = [row_seed(3, f"row-{i}") for i in range(len(mixed_batch))]
    free = [
        generate_batch(model, processor, [row], params, [seed])[0]
        for row, seed in zip(mixed_batch, seeds, strict=True)
    ]
    # rows stop at different steps: one early token of a few of them becomes a stop token
    stops = {free[0].token_ids[1], free[3].token_ids[4]}
    original = set(processor.stop_token_ids)
    processor.stop_token_ids = original | stops
    try:
        alone = [
            generate_batch(model, processor, [row], params, [seed])[0]
            for row, seed in zip(mixed_batch, seeds, strict=True)
        ]
        assert len({r.output_tokens for r in alone}) > 2  # rows really end at different steps
        decoder = Decoder(model, processor, params)
        waiting = list(range(len(mixed_batch)))
        results, joined = {}, 0
        while waiting or decoder.active:
            if decoder.active < 3 and waiting:
                take = waiting[: 3 - decoder.active]
                del waiting[: len(take)]
                running = decoder.active
                decoder.add([(i, mixed_batch[i], seeds[i]) for i in take])
                if running:  # joined: no finished row left, cut to the longest row
                    joined += 1
                    assert [entry.tag for entry in decoder.live][-len(take) :] == take
                    assert len(decoder.live) == decoder.active == running + len(take)
                    assert decoder.cache[0].offset == decoder.longest
            results.update(decoder.step())
    finally:
        processor.stop_token_ids = original
    assert joined >= 2  # rows joined while others ran
    assert sorted(results) == list(range(len(mixed_batch)))
    for i, result in results.items():
        assert result.token_ids == alone[i].token_ids, i
        assert result.finish_reason == alone[i].finish_reason


@pytest.mark.parametrize(
    "settings", [{}, {"temperature": 0.9, "top_k": 50}], ids=["greedy", "sampled"]
)
def test_rows_with_their_own_token_limits_generate_what_they_would_alone(
    loaded, mixed_batch, settings
):
    """A row's own ``max_tokens`` ends it after that many tokens, with the tokens it would
    generate alone under that limit, in a batch of rows with other limits and as rows join
    the slots it leaves; a limit above the batch's is held to the batch's."""
    model, processor = loaded
    params = GenerationParams(max_tokens=9, **settings)
    limits = [3, 9, 1, 6, None, 2, 40]
    rows = [replace(row, max_tokens=k) for row, k in zip(mixed_batch, limits, strict=True)]
    seeds = [row_seed(5, f"row-{i}") for i in range(len(rows))]
    alone = [
        generate_batch(model, processor, [row], replace(params, max_tokens=min(k or 9, 9)), [s])[0]
        for row, k, s in zip(mixed_batch, limits, seeds, strict=True)
    ]
    assert [r.output_tokens for r in alone] == [3, 9, 1, 6, 9, 2, 9]  # none stops on its own
    together = generate_batch(model, processor, rows, params, seeds)
    decoder = Decoder(model, processor, params)
    decoder.add([(i, rows[i], seeds[i]) for i in range(3)])
    waiting, joined, results = list(range(3, len(rows))), 0, {}
    while waiting or decoder.active:
        if decoder.active < 3 and waiting:
            joined += bool(decoder.active)
            row = rows[waiting[0]]
            # the cache a join builds is what the runner's memory bound counts (joining)
            longest = max(decoder.longest, len(row.input_ids))
            positions = kv_positions(longest, max(decoder.room, decoder.limit(row)))
            decoder.add([(waiting[0], row, seeds[waiting.pop(0)])])
            cache = decoder.cache[0]
            assert cache.keys.shape[0] * cache.capacity <= decoder.active * positions
        # the cache has room for every row's limit: decoding never reallocates it
        capacity = decoder.cache[0].capacity
        done = decoder.step(drop=False)
        assert not decoder.active or decoder.cache[0].capacity == capacity
        results.update(done)
    assert joined >= 2
    for i, expected in enumerate(alone):
        for result in (together[i], results[i]):
            assert result.token_ids == expected.token_ids, i
            assert result.finish_reason == "length"


def test_generation_params_are_validated():
    with pytest.raises(ValueError, match="top_p"):
        GenerationParams(top_p=0)
    with pytest.raises(ValueError, match="max_tokens"):
        GenerationParams(max_tokens=0)
    with pytest.raises(ValueError, match="vision_chunk"):
        GenerationParams(vision_chunk=0)


def test_chunk_sizes_follow_the_device_unless_given(loaded):
    model, _ = loaded
    assert chunk_sizes(model, GenerationParams(prefill_chunk=7, vision_chunk=3)) == (7, 3)
    prefill_chunk, vision_chunk = chunk_sizes(model, GenerationParams())
    vision = model.vision.vision_config
    crop_bytes = (vision.grid_size**2 + 1) * vision.intermediate_size * 4  # float32
    if mx.default_device() != mx.cpu:
        assert (prefill_chunk, vision_chunk) == (2048, 32)
        return
    assert prefill_chunk == 256
    assert vision_chunk == max(1, (8 << 20) // crop_bytes)


def test_row_seed_depends_on_job_seed_and_id_only():
    assert row_seed(1, "a") == row_seed(1, "a")
    assert row_seed(1, "a") != row_seed(2, "a")
    assert row_seed(1, "a") != row_seed(1, "b")
    assert 0 <= row_seed(3, "x") < 2**32


def test_batch_invariance_across_the_long_rope_switch(tmp_path):
    """With the short/long RoPE switch at 24 positions, a short row padded past 24 must still
    use its own positions (short factors), exactly as alone."""
    from model.tiny import make_tiny_model

    model, processor = load(str(make_tiny_model(tmp_path, original_max_position_embeddings=24)))
    rows = [
        processor.prepare("Hi", None),
        processor.prepare("Tell me a story about a red square and a blue circle.", None),
        processor.prepare("Describe it.", picture(120, 60, seed=1)),
    ]
    assert min(len(r.input_ids) for r in rows) < 24 - 8 < 24 < max(len(r.input_ids) for r in rows)
    params = GenerationParams(max_tokens=8)
    batched = generate_batch(model, processor, rows, params)
    for row, together in zip(rows, batched, strict=True):
        assert together.token_ids == generate_batch(model, processor, [row], params)[0].token_ids

    # Logits too, which see every difference, not only those that flip a greedy choice.
    def last_logits(group):
        ids, pad = _left_pad(group, processor.pad_token_id)
        cache = make_cache(len(model.layers))
        return prefill(model, ids, pad, cache, image_features(model, group), chunk=64)

    together = last_logits(rows)
    for b, row in enumerate(rows):
        alone = last_logits([row])[0]
        assert float(mx.abs(together[b] - alone).max()) <= 1e-4 * float(mx.abs(alone).max())


def _sharing_rows(processor):
    """Three prompts over picture A, two over B (same size, other pixels), one text-only."""
    a, b = picture(120, 90, seed=11), picture(120, 90, seed=12)
    prompts = [
        ("Describe the picture.", a),
        ("What is in the top left corner of this image?", b),
        ("Caption.", a),
        ("Tell me about the weather.", None),
        ("How many shapes?", b),
        ("Is there a circle in it, and what colour is it?", a),
    ]
    return [processor.prepare(prompt, image) for prompt, image in prompts]


def test_prompt_prefix_ends_at_the_last_image_slot(loaded):
    from model.generate import prompt_prefix
    from model.processing import PreparedRow

    _, processor = loaded
    rows = _sharing_rows(processor)
    assert prompt_prefix(rows[3]) is None  # text only
    length, key = prompt_prefix(rows[0])
    ids = rows[0].input_ids
    assert ids[length - 1] < 0 and all(i >= 0 for i in ids[length:]) and length < len(ids)
    assert prompt_prefix(rows[2])[1] == key  # same image, other prompt
    assert prompt_prefix(rows[1])[1] != key  # same size, other pixels
    image = picture(120, 90, seed=11)
    raw = processor.prepare("<|image_1|>\nCaption.", image, chat=False)
    assert prompt_prefix(raw)[1] != key  # other text before the image
    last = PreparedRow(rows[0].input_ids[:length], rows[0].images)
    assert prompt_prefix(last) is None  # nothing after the image: no second part


def test_shared_prefixes_are_prefilled_once_and_change_no_output(loaded):
    from model.cache import ImageFeatureCache, PrefixCache

    model, processor = loaded
    rows = _sharing_rows(processor)
    params = GenerationParams(max_tokens=6, row_prefill=True)
    alone = [generate_batch(model, processor, [row], params)[0].token_ids for row in rows]
    prefixes, features = PrefixCache(), ImageFeatureCache()
    got = {}
    for batch in ([0, 1], [2, 3, 4], [5]):  # A and B first, then only rows that share them
        before = model.vision.crops_encoded
        results = generate_batch(
            model, processor, [rows[i] for i in batch], params, None, features, prefixes
        )
        got |= {i: r.token_ids for i, r in zip(batch, results, strict=True)}
        if batch != [0, 1]:
            assert model.vision.crops_encoded == before  # prefixes cached: nothing encoded
    assert [got[i] for i in range(len(rows))] == alone
    assert prefixes.hits == 3 and len(prefixes) == 2
    # inside one batch: the second row over A uses the first one's prefix
    prefixes = PrefixCache()
    results = generate_batch(
        model, processor, [rows[0], rows[2], rows[5]], params, None, None, prefixes
    )
    assert [r.token_ids for r in results] == [alone[0], alone[2], alone[5]]
    assert prefixes.hits == 2


def test_prefix_evicted_during_its_batch_is_still_used(loaded):
    from model.cache import PrefixCache
    from model.generate import prompt_prefix

    model, processor = loaded
    rows = _sharing_rows(processor)
    params = GenerationParams(max_tokens=6, row_prefill=True)
    alone = [generate_batch(model, processor, [row], params)[0].token_ids for row in rows]
    prefixes = PrefixCache()
    generate_batch(model, processor, [rows[0]], params, None, None, prefixes)
    prefixes.max_bytes = prefixes.bytes  # room for one prefix: B's will push A's out
    before = model.vision.crops_encoded
    results = generate_batch(model, processor, [rows[1], rows[2]], params, None, None, prefixes)
    assert [r.token_ids for r in results] == [alone[1], alone[2]]
    b_crops = rows[1].images[0].crops.shape[0]
    assert model.vision.crops_encoded - before == b_crops  # A's image was not encoded again
    assert prefixes.get(prompt_prefix(rows[0])[1]) is None
    assert prefixes.get(prompt_prefix(rows[1])[1]) is not None


def test_prefix_cache_changes_nothing_on_the_batched_prefill_path(loaded):
    from model.cache import PrefixCache

    model, processor = loaded
    rows = _sharing_rows(processor)
    params = GenerationParams(max_tokens=4, row_prefill=False)
    plain = generate_batch(model, processor, rows, params)
    prefixes = PrefixCache()
    cached = generate_batch(model, processor, rows, params, None, None, prefixes)
    assert [r.token_ids for r in cached] == [r.token_ids for r in plain]
    assert len(prefixes) == 0


def test_image_features_do_not_depend_on_the_other_images(loaded):
    """Bit for bit on the CPU: which images are encoded together depends on the batch and on
    the caches, and float32 exactness of a row's output must not."""
    model, processor = loaded
    rows = [row for row in _sharing_rows(processor) if row.images][:2]
    rows.append(processor.prepare("Caption.", picture(300, 80, seed=13)))
    alone = image_features(model, rows[2:], chunk=3)
    together = image_features(model, rows, chunk=3)
    assert np.array_equal(np.array(together[-alone.shape[0] :]), np.array(alone))


def test_prefix_too_large_for_the_cache_is_not_kept(loaded):
    from model.cache import PrefixCache

    model, processor = loaded
    rows = _sharing_rows(processor)
    params = GenerationParams(max_tokens=4, row_prefill=True)
    alone = [generate_batch(model, processor, [row], params)[0].token_ids for row in rows[:3]]
    prefixes = PrefixCache(max_bytes=1024)
    results = generate_batch(model, processor, rows[:3], params, None, None, prefixes)
    assert [r.token_ids for r in results] == alone
    assert (
        len(prefixes) == 0 and prefixes.hits == 0 and prefixes.misses == 3
    )  # nothing kept: every row misses


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("row_prefill", [False, True])
def test_kv_positions_is_what_a_batch_allocates(
    loaded, mixed_batch, monkeypatch, static, row_prefill
):
    """The runner holds batches to memory with ``kv_positions``: it must be the batch cache's
    real size (the longest prompt, bucketed under static shapes, plus max_tokens, in blocks)."""
    model, processor = loaded
    sizes = []
    grow = KVCache._grow

    def recording_grow(self, keys, values, needed, batch=0):
        sizes.append(((batch or keys.shape[0]), self._size_for(needed)))
        grow(self, keys, values, needed, batch)

    monkeypatch.setattr(KVCache, "_grow", recording_grow)
    params = GenerationParams(max_tokens=200, row_prefill=row_prefill, static_shapes=static)
    generate_batch(model, processor, mixed_batch, params)
    longest = max(len(row.input_ids) for row in mixed_batch)
    batch_sizes = {size for rows, size in sizes if rows == len(mixed_batch)}
    assert batch_sizes == {kv_positions(longest, 200, static)}
    assert kv_positions(130, 120) == 256 and kv_positions(130, 120, static=True) == 512


def test_prefix_cache_takes_an_eighth_of_the_memory_beside_the_weights():
    from model.cache import PrefixCache

    gib = 1 << 30
    assert PrefixCache.for_memory(24 * gib).max_bytes == 3 * gib
    assert PrefixCache.for_memory(40 * gib, 16 * gib).max_bytes == 3 * gib
    assert PrefixCache.for_memory(24 * gib, 17 * gib).max_bytes == gib  # at least 1 GiB
    assert PrefixCache.for_memory(None).max_bytes == gib


def test_memory_limits_of_a_container_are_read_from_its_cgroup(tmp_path, monkeypatch):
    """On a big machine, a container's limit is the memory that sizes batches and caches."""
    import resource

    from model import generate

    def cgroup(lines: str, files: dict[str, str]) -> int | None:
        root = tmp_path / f"cg{len(list(tmp_path.iterdir()))}"
        for name, text in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(text)
        (root / "self").write_text(lines)
        return generate.cgroup_memory_limit(root / "self", root)

    # v2: the smallest memory.max on the way up; "max" is none
    v2 = {"memory.max": "max\n", "pod/memory.max": "8589934592\n", "pod/job/memory.max": "max\n"}
    assert cgroup("0::/pod/job\n", v2) == 8 << 30
    # v1: the memory controller's line; the unlimited sentinel is none
    v1 = {"memory/memory.limit_in_bytes": "9223372036854771712\n",
          "memory/a/memory.limit_in_bytes": "4294967296\n"}  # fmt: skip
    assert cgroup("4:memory:/a\n3:cpu:/\n0::/\n", v1) == 4 << 30
    # in a container the path is the host's: the limit at the root counts
    assert cgroup("0::/host/path\n", {"memory.max": "1073741824\n"}) == 1 << 30
    assert cgroup("0::/\n", {"memory.max": "max\n"}) is None
    assert generate.cgroup_memory_limit(tmp_path / "missing", tmp_path) is None
    # the figure that sizes batches takes the smallest of the machine, cgroup and ulimit -v
    if mx.default_device() != mx.cpu:
        return  # a GPU's own memory sizes them there
    monkeypatch.setattr(generate, "cgroup_memory_limit", lambda: 3 << 30)
    assert generate.device_memory_bytes() == 3 << 30
    monkeypatch.setattr(resource, "getrlimit", lambda kind: (2 << 30, resource.RLIM_INFINITY))
    assert generate.device_memory_bytes() == 2 << 30


def _rows_computed_alike(model, rows: int = 16) -> bool:
    """Whether this BLAS computes one row of each of the decoder's matmuls the same whatever
    the number of rows beside it. OpenBLAS picks small-matrix and matrix-vector kernels by
    shape, so it does not for narrow layers (the tiny model's); it does for wide ones."""
    rng = np.random.default_rng(0)
    layer = model.model.layers[0]
    linears = [layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj]
    for linear in [*linears, layer.mlp.down_proj, model.lm_head]:
        x = mx.array(rng.standard_normal((rows, 1, linear.weight.shape[1])), mx.float32)
        first = np.array(linear(x)[0])
        if any(not np.array_equal(np.array(linear(x[:m])[0]), first) for m in range(1, rows)):
            return False
    return True


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="a GPU picks kernels by shape")
def test_a_row_decodes_the_same_bits_alone_as_in_any_batch(tmp_path, monkeypatch):
    """Every logit a row produces, at every step, is the same alone as in a batch of rows of
    other lengths that leave and join it: attention sees keys in whole blocks (``KEY_BLOCK``),
    so no key's score depends on how many keys its batch's padding puts after it. On a model
    of real width, where the BLAS computes a matmul row alike whatever the rows beside it."""
    from model import generate
    from model.tiny import make_tiny_model

    wide = {"hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 16}
    model_dir = make_tiny_model(tmp_path, num_hidden_layers=2, vocab_size=4096, **wide)
    model, processor = load(str(model_dir))
    if not _rows_computed_alike(model):
        pytest.skip("this BLAS computes a matmul row by the number of rows")
    rows = [
        processor.prepare(prompt, None if size is None else picture(*size, seed=i))
        for i, (prompt, size) in enumerate(MIXED_ROWS)
    ]
    limits = [3, 7, 1, 6, None, 2, 5]
    rows = [replace(row, max_tokens=k) for row, k in zip(rows, limits, strict=True)]
    seeds = [row_seed(11, f"row-{i}") for i in range(len(rows))]
    params = GenerationParams(max_tokens=7)
    seen: dict[str, dict[tuple[int, int], np.ndarray]] = {"alone": {}, "batched": {}}
    real_sample = generate.sample

    def recording(logits, params, seeds, steps):
        keys = zip(np.array(seeds).tolist(), np.array(steps).tolist(), strict=True)
        for row, key in enumerate(keys):
            record.setdefault(key, np.array(logits[row]))
        return real_sample(logits, params, seeds, steps)

    monkeypatch.setattr(generate, "sample", recording)
    record = seen["alone"]
    for row, seed in zip(rows, seeds, strict=True):
        generate_batch(model, processor, [row], params, [seed])
    record = seen["batched"]
    decoder = Decoder(model, processor, params)
    waiting, joined = list(range(len(rows))), 0
    while waiting or decoder.active:
        if decoder.active < 3 and waiting:
            joined += bool(decoder.active)
            take = waiting[: 3 - decoder.active]
            del waiting[: len(take)]
            decoder.add([(i, rows[i], seeds[i]) for i in take])
        decoder.step()
    assert joined >= 2
    assert len(seen["alone"]) == sum(min(k or 7, 7) for k in limits)  # every step of every row
    for key, alone in seen["alone"].items():
        assert np.array_equal(alone, seen["batched"][key]), key
