"""`jobrunner bench` on the tiny preset: the report's structure and the modes' agreement.

No timing is asserted (timings belong in the bench output, not in tests).
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from jobrunner.bench import MODES, BenchSettings, format_report
from jobrunner.cli import main


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    result = CliRunner().invoke(
        main,
        ["bench", "--preset", "tiny", "--rows", "6", "--max-tokens", "5", "--json", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert "modes 2-5 agree: yes" in result.output  # the printed table says it too
    return json.loads(out.read_text())


def test_every_mode_reports_its_numbers(report):
    assert list(report["modes"]) == list(MODES)
    for mode, numbers in report["modes"].items():
        assert numbers["rows"] >= 1, mode
        assert numbers["seconds"] > 0, mode
        assert numbers["rows_per_second"] > 0, mode
        assert numbers["peak_memory_bytes"] > 0, mode
        assert 0 <= numbers["padding_fraction"] < 1, mode
    for mode in ("unsorted", "sorted", "pipeline"):  # the batched modes run every row
        assert report["modes"][mode]["rows"] == 6
    # every row generates exactly max_tokens: the bench model never emits a stop token
    assert report["modes"]["sorted"]["generated_tokens"] == 6 * 5
    assert report["modes"]["pipeline"]["generated_tokens"] == 6 * 5
    assert set(report["ratios"]["over_naive"]) == set(MODES)
    assert report["ratios"]["over_single"]["single"] == pytest.approx(1.0)


def test_modes_agree_on_tokens(report):
    agreement = report["agreement"]
    assert agreement["modes_2_to_5_agree"] is True
    for mode in ("unsorted", "sorted", "pipeline"):
        assert agreement[mode]["rows_compared"] == 6
        assert agreement[mode]["rows_different"] == 0
    assert agreement["naive"]["rows_compared"] >= 1


def test_sorting_does_not_add_padding(report):
    modes = report["modes"]
    assert modes["sorted"]["padding_fraction"] <= modes["unsorted"]["padding_fraction"]
    # run_job plans the same batches (its summary rounds to 4 decimals)
    assert modes["pipeline"]["padding_fraction"] == pytest.approx(
        modes["sorted"]["padding_fraction"], abs=1e-3
    )


def test_ceilings_roofline_and_targets_are_reported(report):
    assert report["ceilings"]["matmul_gflops"] > 0
    assert report["ceilings"]["read_gbs"] > 0
    roofline = report["roofline"]
    assert roofline["decode_step_seconds"] > 0
    assert roofline["decoder_weight_bytes"] > 0
    assert roofline["prefill_gflops"] > 0
    assert set(report["targets"]) >= {"sorted_over_naive", "sorted_over_single", "sorted_padding"}
    assert all(isinstance(t["met"], bool) for t in report["targets"].values())
    text = format_report(report)
    for mode in MODES:
        assert mode in text


def test_mixed_lengths_compare_rows_joining_running_batches_with_fixed_batches(tmp_path):
    """``--mixed-lengths``: each row generates its own drawn number of tokens in every mode,
    the modes still agree, and mode 4b runs the sorted batches to their longest rows, where
    mode 4's rows join running batches in fewer steps."""
    from jobrunner.bench.workload import load_rows

    out, work = tmp_path / "bench.json", tmp_path / "work"
    args = ["bench", "--preset", "tiny", "--rows", "8", "--max-tokens", "8", "--mixed-lengths"]
    result = CliRunner().invoke(main, [*args, "--workdir", str(work), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "4b fixed" in result.output and "x fixed" in result.output
    report = json.loads(out.read_text())
    assert list(report["modes"]) == [*MODES[:4], "fixed", MODES[4]]
    assert report["agreement"]["modes_2_to_5_agree"] is True
    assert report["agreement"]["fixed"]["rows_different"] == 0
    limits = [row["max_tokens"] for row in load_rows(work / "data" / "bench.jsonl")]
    assert len(set(limits)) > 3 and max(limits) <= 8
    for mode in ("unsorted", "sorted", "fixed", "pipeline"):
        assert report["modes"][mode]["generated_tokens"] == sum(limits), mode
    joined, fixed = report["modes"]["sorted"]["extra"], report["modes"]["fixed"]["extra"]
    assert joined["rows_joined_running"] > 0 and "rows_joined_running" not in fixed
    assert joined["decode_row_steps"] == fixed["decode_row_steps"] == sum(limits)
    assert joined["decode_steps"] < fixed["decode_steps"]
    assert report["ratios"]["sorted_over_fixed"] > 0


def test_clear_cache_empties_mlx_buffer_cache_between_modes(tmp_path, monkeypatch):
    import mlx.core as mx

    clear, cleared = mx.clear_cache, []

    def counting_clear():
        clear()
        cleared.append(mx.get_cache_memory())

    monkeypatch.setattr(mx, "clear_cache", counting_clear)
    out = tmp_path / "bench.json"
    args = ["bench", "--preset", "tiny", "--rows", "4", "--max-tokens", "2", "--clear-cache"]
    result = CliRunner().invoke(main, [*args, "--modes", "single,sorted", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert cleared == [0, 0, 0]  # after the warm-up and after each of the two modes
    assert result.output.count("(cache cleared)") == 3
    report = json.loads(out.read_text())
    assert report["settings"]["clear_cache"] is True
    for mode in ("single", "sorted"):
        assert report["modes"][mode]["extra"]["mlx_cached_after"] >= 0
        assert report["modes"][mode]["extra"]["mlx_active_after"] > 0  # the model's weights


def test_repeat_alternates_the_order_and_reports_each_modes_median_round(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "--preset", "tiny", "--rows", "4", "--max-tokens", "2", "--repeat", "3"]
    result = CliRunner().invoke(main, [*args, "--modes", "single,sorted", "--json", str(out)])
    assert result.exit_code == 0, result.output
    ran = [line.split("(")[1].rstrip(")") for line in result.output.splitlines()
           if line.startswith("bench: mode ")]  # fmt: skip
    assert ran == ["single", "sorted", "sorted", "single", "single", "sorted"]
    assert "rounds: 3" in result.output
    report = json.loads(out.read_text())
    assert report["settings"]["repeat"] == 3
    assert report["agreement"]["rounds_agree"] is True
    for mode in ("single", "sorted"):
        numbers = report["modes"][mode]
        rounds = numbers["extra"]["round_seconds"]
        assert len(rounds) == 3
        assert numbers["seconds"] == sorted(rounds)[1]  # the median round's own figures
        assert numbers["rows_per_second"] == pytest.approx(numbers["rows"] / numbers["seconds"])


def test_settings_are_validated():
    with pytest.raises(ValueError, match="preset"):
        BenchSettings(preset="huge").resolved()
    with pytest.raises(ValueError, match="modes"):
        BenchSettings(preset="tiny", modes=("sorted", "fastest")).resolved()
    with pytest.raises(ValueError, match="--mixed-lengths"):
        BenchSettings(preset="tiny", peer=True, mixed_lengths=True).resolved()
    with pytest.raises(ValueError, match="repeat"):
        BenchSettings(preset="tiny", repeat=0).resolved()
    result = CliRunner().invoke(main, ["bench", "--preset", "tiny", "--modes", "sorted,bogus"])
    assert result.exit_code == 2
    assert "unknown modes" in result.output


# -- the engine levers the bench measures --------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    from model.loading import load

    return load(str(tiny_model_dir))


def _rows(processor, n_images: int = 3):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    pictures = [
        Image.fromarray(rng.integers(0, 256, size=(40 + 30 * k, 90, 3), dtype=np.uint8))
        for k in range(n_images)
    ]
    prompts = ["Describe it.", "What colour is the square on the left?", "Caption."]
    rows = [processor.prepare(p, pictures[k % n_images]) for k, p in enumerate(prompts * 2)]
    return rows + [processor.prepare("Tell me a story about a red circle.", None)]


def test_row_prefill_equals_batched_prefill_and_each_row_alone(loaded):
    import mlx.core as mx

    from model.cache import make_cache
    from model.generate import (
        GenerationParams,
        _left_pad,
        features_by_row,
        generate_batch,
        image_features,
        prefill,
        prefill_rows,
    )

    model, processor = loaded
    rows = _rows(processor)
    ids, pad = _left_pad(rows, processor.pad_token_id)
    features = image_features(model, rows)
    batched_cache, row_cache = make_cache(len(model.layers)), make_cache(len(model.layers))
    batched = prefill(model, ids, pad, batched_cache, features, chunk=64)
    per_row = features_by_row(rows, features)
    by_row = prefill_rows(model, rows, ids.shape[1], row_cache, per_row, chunk=64)
    scale = float(mx.abs(batched).max())
    assert float(mx.abs(batched - by_row).max()) <= 1e-4 * scale
    for b in range(len(rows)):  # the real positions of the cache hold the same keys
        start = int(pad[b])
        k_batched = batched_cache[0].state[0][b, :, start:]
        k_row = row_cache[0].state[0][b, :, start:]
        assert float(mx.abs(k_batched - k_row).max()) <= 1e-4 * float(mx.abs(k_row).max())
    results = {}
    for row_prefill in (False, True):
        params = GenerationParams(max_tokens=6, row_prefill=row_prefill)
        results[row_prefill] = [r.token_ids for r in generate_batch(model, processor, rows, params)]
    assert results[True] == results[False]


def test_shared_images_are_encoded_once(loaded):
    from model.cache import ImageFeatureCache
    from model.generate import GenerationParams, generate_batch, image_features

    model, processor = loaded
    rows = _rows(processor)  # 6 image rows over 3 distinct images
    distinct = {image.key: image for row in rows for image in row.images}
    crops = sum(image.crops.shape[0] for image in distinct.values())
    before = model.vision.crops_encoded
    shared = image_features(model, rows)
    assert model.vision.crops_encoded - before == crops  # each distinct image once
    cache = ImageFeatureCache()
    first = image_features(model, rows[:3], cache=cache)
    before = model.vision.crops_encoded
    again = image_features(model, rows[3:6], cache=cache)  # same three images, other prompts
    assert model.vision.crops_encoded == before
    assert cache.hits == 3
    assert shared.shape[0] == first.shape[0] + again.shape[0]
    params = GenerationParams(max_tokens=5)
    plain = [r.token_ids for r in generate_batch(model, processor, rows[3:], params)]
    cached = generate_batch(model, processor, rows[3:], params, feature_cache=cache)
    assert [r.token_ids for r in cached] == plain


def test_feature_cache_is_bounded():
    import mlx.core as mx

    from model.cache import ImageFeatureCache

    cache = ImageFeatureCache(max_bytes=3 * 400)
    for k in range(5):
        cache.put(str(k), mx.zeros((100,), dtype=mx.float32))  # 400 bytes each
    assert cache.bytes <= 1200
    assert cache.get("0") is None and cache.get("4") is not None


def test_batch_limits_follow_memory(loaded):
    from model.generate import batch_limits, kv_bytes_per_token

    model, _ = loaded
    per_token = kv_bytes_per_token(model)
    c = model.config
    assert per_token == 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4
    small = batch_limits(model, 64, memory_bytes=50 << 20, prompt_tokens=500)
    large = batch_limits(model, 64, memory_bytes=4 << 30, prompt_tokens=500)
    assert 1 <= small[0] < large[0] <= 256
    assert small[0] * (500 + 64) * per_token <= (50 << 20) * 0.5


def test_prefill_flops_count_causal_attention():
    from types import SimpleNamespace

    from jobrunner.bench import prefill_flops
    from model.config import ModelConfig
    from model.tiny import tiny_config

    config = ModelConfig.from_dict(tiny_config())
    model = SimpleNamespace(config=config)
    c, length = config, 7
    qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
    per_token = 2 * c.hidden_size * (qkv + c.hidden_size + 3 * c.intermediate_size)
    layer = sum(per_token + 4 * c.num_attention_heads * c.head_dim * (i + 1) for i in range(length))
    one_row = c.num_hidden_layers * layer + 2 * c.hidden_size * c.vocab_size
    assert prefill_flops(model, 3, length) == 3 * one_row


def test_peer_mode_runs_mlx_vlm_on_the_same_rows(tmp_path):
    """Mode 6 (mlx-vlm, installed by the dev extra) runs its batch_generate on the small
    preset's model and rows: every row once, max_tokens each; its rows without an image give
    jobrunner's text, and rows given in one call are checked against each alone."""
    out = tmp_path / "bench.json"
    args = ["bench", "--preset", "small", "--rows", "12", "--max-tokens", "3", "--batch-size", "4"]
    result = CliRunner().invoke(main, [*args, "--modes", "sorted", "--peer", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "6 peer" in result.output and "peer (mode 6): mlx-vlm" in result.output
    report = json.loads(out.read_text())
    peer = report["modes"]["peer"]
    assert peer["rows"] == 12 and peer["generated_tokens"] == 12 * 3
    assert report["ratios"]["sorted_over_peer"] > 0
    without_image = report["peer"]["rows_without_image"]
    assert without_image["compared"] >= 2 and without_image["same"] == without_image["compared"]
    assert report["peer"]["rows_with_image"]["compared"] == 12 - without_image["compared"]
    # its text-only rows share a call; they are checked against each row alone
    assert report["peer"]["rows_checked_alone"] >= 2
    assert report["peer"]["rows_same_as_alone"] == report["peer"]["rows_checked_alone"]


def test_peer_mode_is_refused_where_it_cannot_run(monkeypatch):
    result = CliRunner().invoke(main, ["bench", "--preset", "tiny", "--peer"])
    assert result.exit_code == 2
    assert "336-pixel crops" in result.output and "--preset small" in result.output
    monkeypatch.setattr("jobrunner.bench.peer.peer_version", lambda: None)
    result = CliRunner().invoke(main, ["bench", "--preset", "small", "--peer"])
    assert result.exit_code == 2
    assert "pip install 'mlx-vlm'" in result.output
