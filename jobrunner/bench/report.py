"""The bench report: ratios between modes, token agreement, targets, and the plain-text table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .modes import LABELS, ModeResult


def _ratios(results: dict[str, ModeResult]) -> dict[str, dict[str, float]]:
    """rows/s of every mode over rows/s of mode 1 (naive) and mode 2 (single)."""
    out = {}
    for base in ("naive", "single"):
        if base in results and results[base].rows_per_second:
            rate = results[base].rows_per_second
            out[f"over_{base}"] = {m: r.rows_per_second / rate for m, r in results.items()}
    if "sorted" in results and "unsorted" in results:
        out["sorted_over_unsorted"] = (
            results["sorted"].rows_per_second / results["unsorted"].rows_per_second
        )
    if "sorted" in results and "peer" in results:
        out["sorted_over_peer"] = (
            results["sorted"].rows_per_second / results["peer"].rows_per_second
        )
    if "sorted" in results and "fixed" in results:
        out["sorted_over_fixed"] = (
            results["sorted"].rows_per_second / results["fixed"].rows_per_second
        )
    if "sorted" in results and "pipeline" in results:
        out["pipeline_over_sorted"] = (
            results["pipeline"].rows_per_second / results["sorted"].rows_per_second
        )
    return out


def _agreement(tokens: dict[str, dict], processor) -> dict[str, Any]:
    """Do the modes produce the same tokens on the rows they share?

    Each batched mode is compared with the first engine mode that ran (token ids); mode 5,
    which writes text, by decoded text and token count; mode 1 (no cache) with mode 2 when
    both ran; it may differ by float rounding and is not part of the verdict.
    """
    engine = [m for m in ("single", "unsorted", "sorted", "fixed") if m in tokens]
    if not engine:
        return {"modes_2_to_5_agree": None}
    out: dict[str, Any] = {}
    for mode in tokens:
        base = "single" if mode == "naive" and "single" in tokens else engine[0]
        if mode == base or (mode == "naive" and base != "single"):
            continue
        ref = tokens[base]
        shared = sorted(set(tokens[mode]) & set(ref))
        if mode == "pipeline":
            expected = {i: (processor.decode(ref[i]), len(ref[i])) for i in shared}
        else:
            expected = ref
        different = [i for i in shared if tokens[mode][i] != expected[i]]
        out[mode] = {
            "reference": base,
            "rows_compared": len(shared),
            "rows_different": len(different),
        }
        if mode != "pipeline":  # where each differing row first departs (0-based token)
            out[mode]["first_difference"] = [
                _first_difference(tokens[mode][i], expected[i]) for i in different
            ]
    verdict = [v["rows_different"] == 0 for k, v in out.items() if k != "naive"]
    out["modes_2_to_5_agree"] = all(verdict) if verdict else None
    return out


def _first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))


def _targets(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it is met."""
    modes, ratios, roof = report["modes"], report["ratios"], report["roofline"]
    checks = {}

    def check(name: str, value: float | None, goal: float, at_least: bool = True) -> None:
        if value is None:
            return
        met = value >= goal if at_least else value <= goal
        checks[name] = {"value": round(value, 4), "goal": goal, "met": bool(met)}

    check("sorted_over_naive", ratios.get("over_naive", {}).get("sorted"), 20.0)
    check("sorted_over_single", ratios.get("over_single", {}).get("sorted"), 4.0)
    check("sorted_over_unsorted", ratios.get("sorted_over_unsorted"), 1.3)
    check("sorted_padding", modes.get("sorted", {}).get("padding_fraction"), 0.10, False)
    check("pipeline_over_sorted", ratios.get("pipeline_over_sorted"), 0.9)
    check("decode_step_over_weight_stream", roof["decode_step_over_weight_stream"], 1.5, False)
    check("prefill_fraction_of_matmul", roof["prefill_fraction_of_matmul"], 0.5)
    return checks


# ---------------------------------------------------------------------------------------------
# The table


def _mib(n: float) -> str:
    return f"{n / (1 << 20):,.0f}"


def format_report(report: dict[str, Any]) -> str:
    """The report as a plain-text table plus ceilings, roofline, agreement and targets."""
    s, c, m = report["settings"], report["ceilings"], report["model"]
    lines = [
        f"jobrunner bench: preset {s['preset']}, {s['dtype']}, {report['machine']['device']} "
        f"({report['machine']['cpus']} cpus, BLAS {report['machine']['blas'] or 'reference'}), "
        f"mlx {report['machine']['mlx']}",
        f"model: {m['parameters'] / 1e6:.1f}M parameters ({_mib(m['weight_bytes'])} MiB), "
        f"prompts {m['prompt_tokens_min']}-{m['prompt_tokens_max']} tokens "
        f"(mean {m['prompt_tokens_mean']:.0f}), {m['images']} images / {m['crops']} crops, "
        f"{'1-' if s['mixed_lengths'] else ''}{s['max_tokens']} new tokens per row"
        f"{' (drawn)' if s['mixed_lengths'] else ''}, batch {s['batch_size']}",
        "",
        f"{'mode':<12}{'rows':>5}{'s':>8}{'rows/s':>9}{'prompt tok/s':>13}{'gen tok/s':>10}"
        f"{'padding':>8}{'peak MiB':>9}{'x(1)':>7}{'x(2)':>7}",
    ]
    over_naive = report["ratios"].get("over_naive", {})
    over_single = report["ratios"].get("over_single", {})
    for mode, r in report["modes"].items():
        ratio1 = f"{over_naive[mode]:.1f}" if mode in over_naive else "-"
        ratio2 = f"{over_single[mode]:.2f}" if mode in over_single else "-"
        name = f"{LABELS[mode]} {mode}"
        lines.append(
            f"{name:<12}{r['rows']:>5}{r['seconds']:>8.1f}{r['rows_per_second']:>9.3f}"
            f"{r['prompt_tokens_per_second']:>13.0f}{r['generated_tokens_per_second']:>10.1f}"
            f"{r['padding_fraction']:>8.1%}{_mib(r['peak_memory_bytes']):>9}{ratio1:>7}{ratio2:>7}"
        )
    roof = report["roofline"]
    lines += [
        "",
        f"ceilings: matmul {c['matmul_gflops']:.0f} GFLOP/s ({c['matmul_size']}^3), "
        f"read {c['read_gbs']:.1f} GB/s (reduce {c['read_gbs_reduce']:.1f}, "
        f"gemv {c['read_gbs_gemv']:.1f})",
        f"decode step (batch 1): {roof['decode_step_seconds'] * 1e3:.1f} ms vs weight stream "
        f"{roof['weight_stream_seconds'] * 1e3:.1f} ms ({_mib(roof['decoder_weight_bytes'])} MiB"
        f" / {c['read_gbs']:.1f} GB/s): {roof['decode_step_over_weight_stream']:.2f}x",
        f"prefill of {roof['prefill_tokens']} tokens: "
        f"{roof['prefill_gflops']:.0f} GFLOP/s = {roof['prefill_fraction_of_matmul']:.0%} "
        "of the matmul ceiling",
        _memory_line(report),
        *_rounds_line(report),
        *_steps_line(report),
        _agreement_line(report["agreement"]),
        *_peer_lines(report),
        "targets: "
        + ", ".join(
            f"{name} {t['value']:g} ({'met' if t['met'] else 'NOT met'}, goal "
            f"{'>=' if name not in _AT_MOST else '<='} {t['goal']:g})"
            for name, t in report["targets"].items()
        ),
    ]
    return "\n".join(lines)


def _rounds_line(report: dict[str, Any]) -> list[str]:
    """With ``--repeat``: every round's seconds per mode, around the median the table shows."""
    rounds = report["settings"].get("repeat", 1)
    if rounds < 2:
        return []
    parts = [
        f"{mode} " + ", ".join(f"{t:.1f}" for t in r["extra"]["round_seconds"])
        for mode, r in report["modes"].items()
        if "round_seconds" in r["extra"]
    ]
    same = report["agreement"].get("rounds_agree")
    return [
        f"rounds: {rounds}, every other one in reverse order; the table has each mode's median "
        f"round; seconds by round: {'; '.join(parts)}"
        + ("" if same else "; the rounds did NOT give the same tokens")
    ]


def _steps_line(report: dict[str, Any]) -> list[str]:
    """Decode steps of the batched modes, the rows generating a token in a step on average,
    and what joining running batches bought."""
    parts = [
        f"{mode} {r['extra']['decode_steps']} ("
        f"{r['extra']['decode_row_steps'] / max(r['extra']['decode_steps'], 1):.1f} rows a step"
        + (
            f", {r['extra']['rows_joined_running']} rows joined running batches"
            if "rows_joined_running" in r["extra"]
            else ""
        )
        + ")"
        for mode, r in report["modes"].items()
        if "decode_steps" in r["extra"] and mode != "single"
    ]
    if not parts:
        return []
    line = "decode steps: " + "; ".join(parts)
    if "sorted_over_fixed" in report["ratios"]:
        line += f"; sorted (joins) is {report['ratios']['sorted_over_fixed']:.2f}x fixed"
    return [line]


def _memory_line(report: dict[str, Any]) -> str:
    mem, modes = report["memory"], report["modes"]
    peak = max(r["peak_memory_bytes"] for r in modes.values())
    overhead = peak - mem["weight_bytes"] - mem["kv_budget_bytes"]
    line = (
        f"memory: peak {_mib(peak)} MiB = weights {_mib(mem['weight_bytes'])} + KV budget "
        f"{_mib(mem['kv_budget_bytes'])} + other {_mib(overhead)} MiB"
    )
    if mem["suggested_batch_size"]:
        line += (
            f"; from {_mib(mem['machine_memory_bytes'])} MiB batch_limits() would choose "
            f"batch {mem['suggested_batch_size']}, {mem['suggested_max_batch_tokens']} tokens"
        )
    return line


_AT_MOST = {"sorted_padding", "decode_step_over_weight_stream"}


def _peer_lines(report: dict[str, Any]) -> list[str]:
    peer = report.get("peer")
    if not peer:
        return []
    extra = report["modes"]["peer"]["extra"]
    line = f"peer (mode 6): {peer['peer']} batch_generate"
    if "sorted_over_peer" in report["ratios"]:
        line += f"; sorted is {report['ratios']['sorted_over_peer']:.2f}x its rows/s"
    lines = [line]
    if extra["calls_that_could_not_batch"]:
        lines.append(
            f"  {extra['calls_that_could_not_batch']} of {extra['calls']} calls could not run "
            f"their rows together and ran them one by one: {extra['first_error']}"
        )
    lines.append(
        f"  rows given in one call with others, then alone: {peer['rows_same_as_alone']}/"
        f"{peer['rows_checked_alone']} same text"
    )
    if "same_text_as" in peer:
        with_image, without = peer["rows_with_image"], peer["rows_without_image"]
        lines.append(
            f"  same text as {peer['same_text_as']}: {with_image['same']}/{with_image['compared']}"
            f" rows with an image, {without['same']}/{without['compared']} without"
        )
    return lines


def _agreement_line(agreement: dict[str, Any]) -> str:
    parts = [
        f"{mode} {v['rows_compared'] - v['rows_different']}/{v['rows_compared']} same as "
        f"{v['reference']}"
        for mode, v in agreement.items()
        if isinstance(v, dict)
    ]
    verdict = {True: "yes", False: "NO", None: "n/a"}[agreement["modes_2_to_5_agree"]]
    return f"tokens: modes 2-5 agree: {verdict} ({'; '.join(parts)})"
