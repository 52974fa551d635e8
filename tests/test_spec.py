"""Job spec: merging file and flags, validation messages, job files, fingerprints."""

import dataclasses
import json
import os
from pathlib import Path

import pytest

from jobrunner import writers
from jobrunner.checkpoint import describe_changes
from jobrunner.spec import (
    RESERVED_COLUMNS,
    JobSpec,
    SpecError,
    build_spec,
    comparable_fields,
    fingerprint,
    fingerprint_fields,
    input_identity,
    job_file_paths,
    load_job_file,
    template_fields,
)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"image": "a.png", "prompt": "hi"}\n')
    return path


def spec_for(data: Path, **values) -> JobSpec:
    return build_spec({}, {"input": data, "model": "org/model", **values})


def test_flags_override_file_and_none_keeps_file_value(data: Path) -> None:
    file_values = {"input": data, "model": "org/model", "max_tokens": 10, "temperature": 0.5}
    spec = build_spec(file_values, {"max_tokens": 20, "temperature": None, "overwrite": None})
    assert spec.max_tokens == 20
    assert spec.temperature == 0.5
    assert spec.overwrite is False


def test_defaults_output_next_to_input(data: Path) -> None:
    spec = spec_for(data)
    assert spec.output == data.with_name("rows.out.parquet")
    assert spec.parts_dir == data.with_name("rows.out.parquet.parts")
    assert spec.batch_size == 16 and spec.chat is True and spec.shard is None
    assert spec_for(data, checkpoint_dir=data.parent / "ck").parts_dir == data.parent / "ck"


def test_relative_cli_paths_become_absolute(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(data.parent)
    spec = spec_for(Path("rows.jsonl"), output="out/x.parquet")
    assert spec.input == data
    assert spec.output == data.parent / "out" / "x.parquet"


def test_one_folder_named_from_two_places_is_one_path(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``..`` and ``.`` are taken out of paths, so a job started from one folder resumes from
    another (its fingerprint names the same input and model)."""
    model = tmp_path / "models" / "tiny"
    (tmp_path / "sub").mkdir()
    model.mkdir(parents=True)
    straight = build_spec({}, {"input": data, "model": str(model)})
    monkeypatch.chdir(tmp_path / "sub")
    winding = build_spec(
        {}, {"input": Path("..") / "." / data.name, "model": "../models/../models/tiny"}
    )
    assert winding.input == straight.input == data
    assert winding.model == straight.model == str(model)
    assert fingerprint(winding, {}, {}) == fingerprint(straight, {}, {})
    # ``link/..`` is the parent of the link's target, as the system resolves it
    (tmp_path / "elsewhere" / "deep").mkdir(parents=True)
    (tmp_path / "elsewhere" / data.name).write_text(data.read_text())
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere" / "deep")
    linked = build_spec({}, {"input": tmp_path / "link" / ".." / data.name, "model": "org/m"})
    assert linked.input == tmp_path / "elsewhere" / data.name


def test_job_file_resolves_paths_against_its_folder(tmp_path: Path, data: Path) -> None:
    jobs = tmp_path / "jobs"
    (jobs / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "imgs").mkdir()
    job = jobs / "job.toml"
    job.write_text(
        'input = "../rows.jsonl"\noutput = "out/r.parquet"\nimage_root = "../imgs"\n'
        'model = "models/tiny"\nmax_tokens = 12\nshard = "1/3"\nkeep_columns = ["a"]\n'
    )
    spec = build_spec(load_job_file(job), {})
    assert spec.input.resolve() == data.resolve()
    assert spec.output == jobs / "out" / "r.parquet"
    assert spec.image_root == (tmp_path / "imgs").resolve()
    assert spec.model == str(jobs / "models" / "tiny")
    assert (spec.max_tokens, spec.shard, spec.keep_columns) == (12, (1, 3), ("a",))


def test_job_file_keeps_hub_ids(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text('model = "microsoft/Phi-3.5-vision-instruct"\n')
    assert load_job_file(job)["model"] == "microsoft/Phi-3.5-vision-instruct"


def test_job_file_unknown_key_is_named_with_a_suggestion(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text('input = "x.jsonl"\nmax-tokens = 3\n')
    with pytest.raises(SpecError, match="unknown key 'max-tokens'.*max_tokens") as info:
        load_job_file(job)
    assert info.value.fields == ("max-tokens",)


@pytest.mark.parametrize("text", ["input = ", "[generation]\nmax_tokens = 1\n"])
def test_job_file_bad_toml_or_table(tmp_path: Path, text: str) -> None:
    job = tmp_path / "job.toml"
    job.write_text(text)
    with pytest.raises(SpecError, match="job.toml"):
        load_job_file(job)


def test_job_file_missing(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="not found"):
        load_job_file(tmp_path / "nope.toml")


def test_job_file_not_utf8_says_so(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_bytes('model = "tiny"\nprompt = "caf\u00e9"\n'.encode("latin-1"))
    with pytest.raises(SpecError, match="job.toml is not UTF-8") as info:
        load_job_file(job)
    assert info.value.fields == ("job_file",)


def test_job_file_paths_name_output_and_checkpoint_folder(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text('input = "rows.jsonl"\ncheckpoint_dir = "ck"\n')
    assert job_file_paths(load_job_file(job)) == (tmp_path / "rows.out.parquet", tmp_path / "ck")
    job.write_text('output = "o/r.parquet"\n')
    assert job_file_paths(load_job_file(job)) == (
        tmp_path / "o" / "r.parquet",
        tmp_path / "o" / "r.parquet.parts",
    )
    for text in ('model = "m"\n', "input = 5\n"):  # a number is no path either
        job.write_text(text)
        with pytest.raises(SpecError, match="sets no `output` or `input` path"):
            job_file_paths(load_job_file(job))


@pytest.mark.parametrize(
    ("text", "lines"),
    [
        ('max_tokens = 3\nmodel = "m"\nmax_tokens = 5\nquiet = true\n', "lines 1 and 3"),
        ('max_tokens = 3\nmodel = "m"\nmax_tokens = 5', "lines 1 and 3"),  # the parser: "end"
        ('"max_tokens" = 3\n\nmax_tokens = 5\n\n', "lines 1 and 3"),
    ],
)
def test_job_file_key_set_twice_is_named_with_its_lines(
    tmp_path: Path, text: str, lines: str
) -> None:
    job = tmp_path / "job.toml"
    job.write_text(text)
    with pytest.raises(SpecError, match=f"sets `max_tokens` more than once \\({lines}\\)"):
        load_job_file(job)


def test_job_file_with_a_byte_order_mark_loads(tmp_path: Path) -> None:
    """Windows editors may save UTF-8 with a BOM, which the TOML parser calls line 1 invalid."""
    job = tmp_path / "job.toml"
    job.write_bytes(b'\xef\xbb\xbfmodel = "org/m"\nmax_tokens = 3\n')
    assert load_job_file(job) == {"model": "org/m", "max_tokens": 3}
    job.write_bytes(b'\xef\xbb\xbfmodel = "\xff"\n')
    with pytest.raises(SpecError, match=r"not UTF-8 text \(byte 12\)"):  # counted in the file
        load_job_file(job)


@pytest.mark.parametrize("field", ["output", "image_root", "checkpoint_dir"])
def test_job_file_empty_path_is_refused_not_taken_as_its_folder(
    tmp_path: Path, data: Path, field: str
) -> None:
    """TOML has no null: ``checkpoint_dir = ""`` put the parts and manifest in the job file's
    folder, and ``image_root = ""`` confined images to it, without a word."""
    job = tmp_path / "job.toml"
    job.write_text(f'input = "{data.name}"\nmodel = "org/m"\n{field} = ""\n')
    with pytest.raises(SpecError, match=f"{field}: got '', expected a file system path"):
        build_spec(load_job_file(job), {})


@pytest.mark.parametrize("path", ["out/$DATE.parquet", "${RESULTS}/o.parquet"])
def test_job_file_environment_variable_in_a_path_is_refused(tmp_path: Path, path: str) -> None:
    """Kept as text, ``$DATE`` made a folder or file literally named so, night after night."""
    job = tmp_path / "job.toml"
    job.write_text(f'input = "rows.jsonl"\noutput = "{path}"\n')
    with pytest.raises(SpecError, match="do not expand environment variables") as info:
        load_job_file(job)
    assert info.value.fields == ("output",)


def test_job_file_model_is_not_looked_up_in_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative model missing from the job file's folder was loaded from the current folder
    where one of that name was there: the job depended on where it was run from."""
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    job = jobs / "job.toml"
    job.write_text('model = "models/tiny"\n')
    assert load_job_file(job)["model"] == "models/tiny"  # elsewhere: a hub id, as documented
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError, match="there is no .*jobs/models/tiny, but there is a folder"):
        load_job_file(job)
    (jobs / "models" / "tiny").mkdir(parents=True)  # the job file's own: no doubt
    assert load_job_file(job)["model"] == str(jobs / "models" / "tiny")


@pytest.mark.parametrize(
    ("text", "fix"),
    [
        ("[job]\nmax_tokens = 3\n", "a table .* job files set every key at the top level"),
        ("generation.max_tokens = 3\n", "a table .* job files set every key at the top level"),
        ('checkpoint_every = "30s"\n', "`checkpoint_every_rows` and/or `checkpoint_every_seconds`"),
        ('checkpoint-every = "30s"\n', "`checkpoint_every_rows` and/or `checkpoint_every_seconds`"),
        ("zzqqx = 1\n", "captions.example.toml lists every key"),
    ],
)
def test_job_file_unknown_key_says_what_to_do(tmp_path: Path, text: str, fix: str) -> None:
    job = tmp_path / "job.toml"
    job.write_text(text)
    with pytest.raises(SpecError, match=fix):
        load_job_file(job)


BAD_VALUES = [
    ("max_tokens", 0),
    ("max_tokens", "ten"),
    ("max_tokens", True),
    ("max_tokens", 2.5),
    ("temperature", -0.1),
    ("temperature", float("nan")),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_k", -1),
    ("seed", -1),
    ("batch_size", 0),
    ("max_batch_tokens", 0),
    ("num_crops", 0),
    ("dtype", "int8"),
    ("quantize", 3),
    ("quantize", True),
    ("shard", "2/2"),
    ("shard", "a/b"),
    ("shard", "1"),
    ("shard", [3, 2]),
    ("overwrite", "yes"),
    ("quiet", 1),
    ("chat", "no"),
    ("group_images", "yes"),
    ("keep_columns", ["output"]),
    ("keep_columns", ["row_index"]),
    ("keep_columns", 5),
    ("prompt", "{}"),
    ("prompt", "Describe {a"),
    ("prompt", "{a.b}"),
    ("prompt", "Q: {prompt!z}"),
    ("prompt", "{a:zz}"),
    ("prompt", "{a!r:d}"),
    ("prompt", "{a:>1000000000}"),  # a gigabyte per value: refused before formatting one
    ("prompt", "{a:.2000000f}"),
    ("prompt", "{a:\n>1000000000}"),  # a newline as the fill
    ("prompt", "{a:>" + "9" * 5000 + "}"),  # past int()'s digit limit
    ("prompt", "  "),
    ("id_column", ""),
    ("max_tokens_column", ""),
    ("max_tokens_column", 5),
    ("image_column", 3),
    ("checkpoint_every_rows", -1),
    ("checkpoint_every_seconds", float("inf")),
    ("max_image_pixels", 0),
    ("sort_window", 0),
    ("workers", 0),
    ("model", ""),
]


@pytest.mark.parametrize(("field", "value"), BAD_VALUES)
def test_each_bad_value_names_its_field_and_flag(data: Path, field: str, value: object) -> None:
    with pytest.raises(SpecError) as info:
        spec_for(data, **{field: value})
    assert info.value.fields == (field,)
    message = str(info.value)
    assert f"{field}:" in message
    import re

    from jobrunner.cli import run

    flags = {o for p in run.params for o in (*p.opts, *getattr(p, "secondary_opts", []))}
    named = re.findall(r"--[a-z][a-z-]*", message)
    assert named, message  # it says which flag to set ...
    assert set(named) <= flags, message  # ... and the flag exists


@pytest.mark.parametrize(
    ("field", "values", "needle"),
    [
        ("input", {"input": "missing.jsonl"}, "not found"),
        ("input", {"input": "rows.csv"}, ".jsonl or .parquet"),
        ("input", {"input": "."}, "not a file"),
        ("output", {"output": "out.csv"}, ".parquet"),
        ("output", {"output": "."}, ".parquet"),
        ("image_root", {"image_root": "no-such-dir"}, "not an existing folder"),
        ("checkpoint_every_rows", {"checkpoint_every_rows": 0, "checkpoint_every_seconds": 0}, "0"),
        ("id_column", {"image_column": "prompt"}, "must differ"),
        ("max_tokens_column", {"max_tokens_column": "prompt"}, "already the id, image or prompt"),
    ],
)
def test_cross_field_errors_name_the_field(
    data: Path, monkeypatch: pytest.MonkeyPatch, field: str, values: dict, needle: str
) -> None:
    monkeypatch.chdir(data.parent)
    (data.parent / "rows.csv").write_text("a,b\n")
    with pytest.raises(SpecError, match=needle) as info:
        spec_for(data, **values)
    assert field in info.value.fields
    assert f"{field}:" in str(info.value)


def test_reserved_columns_are_the_output_columns() -> None:
    assert set(RESERVED_COLUMNS) == writers.RESERVED_COLUMNS
    assert RESERVED_COLUMNS == tuple(writers.results_schema().names)


def test_output_under_a_file_is_refused(data: Path) -> None:
    with pytest.raises(SpecError, match="is a file, not a folder") as info:
        spec_for(data, output=data / "out.parquet")
    assert info.value.fields == ("output",)  # not also the default checkpoint folder under it
    with pytest.raises(SpecError, match="rows.jsonl is a file") as info:
        spec_for(data, checkpoint_dir=data / "ck")
    assert info.value.fields == ("checkpoint_dir",)


@pytest.mark.parametrize("field", ["output", "checkpoint_dir"])
def test_unwritable_folder_is_named(
    data: Path, monkeypatch: pytest.MonkeyPatch, field: str
) -> None:
    # A read-only mount or a folder without write permission (os.access says so even for root
    # on a read-only file system; chmod cannot show it when the tests run as root).
    locked = data.parent / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked and real_access(p, mode))
    target = {"output": locked / "new" / "out.parquet", "checkpoint_dir": locked / "ck"}
    with pytest.raises(SpecError, match=f"cannot write in the folder {locked} ") as info:
        spec_for(data, **{field: target[field]})
    assert info.value.fields == (field,)
    assert "--" + field.replace("_", "-") in str(info.value)
    assert spec_for(data, output=data.parent / "new" / "out.parquet")  # a folder to be made


def test_output_may_not_be_the_input(tmp_path: Path) -> None:
    source = tmp_path / "rows.parquet"
    source.write_bytes(b"")
    with pytest.raises(SpecError, match="is the input") as info:
        build_spec({}, {"input": source, "model": "m", "output": source})
    assert info.value.fields == ("output",)


def test_missing_input_and_model_are_required() -> None:
    with pytest.raises(SpecError) as info:
        build_spec({}, {})
    assert set(info.value.fields) == {"input", "model"}
    assert "--model" in str(info.value)


def test_every_problem_is_reported_at_once(data: Path) -> None:
    with pytest.raises(SpecError) as info:
        spec_for(data, max_tokens=0, top_p=2.0, shard="5/2")
    assert set(info.value.fields) == {"max_tokens", "top_p", "shard"}


def test_unknown_cli_option(data: Path) -> None:
    with pytest.raises(SpecError, match="max_token"):
        spec_for(data, max_token=3)


def test_normalisation(data: Path) -> None:
    spec = spec_for(data, shard=[1, 3], keep_columns="a, b,,a", dtype="bf16", quantize=4)
    assert spec.shard == (1, 3)
    assert spec.keep_columns == ("a", "b")
    assert (spec.dtype, spec.quantize) == ("bfloat16", 4)
    assert spec_for(data, shard="0/1").shard is None
    assert spec_for(data, dtype="auto").dtype is None
    assert spec_for(data, temperature=1).temperature == 1.0


def test_owns_row_is_a_partition(data: Path) -> None:
    shards = [spec_for(data, shard=f"{k}/3") for k in range(3)]
    for index in range(50):
        assert sum(spec.owns_row(index) for spec in shards) == 1
    assert all(spec_for(data).owns_row(i) for i in range(5))


def test_to_dict_is_json_and_round_trips(data: Path, tmp_path: Path) -> None:
    spec = spec_for(data, shard="1/2", keep_columns=["a"], image_root=tmp_path, prompt="Hi {a}")
    restored = JobSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert restored == spec


def test_template_fields() -> None:
    assert template_fields("{a} {{b}} {c:>5} {a} {my col}") == ("a", "c", "my col")
    assert template_fields("no fields {{}}") == ()
    # conversions str.format knows, and format specs that numbers (only) take, pass
    assert template_fields("{a!r} {b!s:>4} {c!a} {n:.2f} {m:05d}") == ("a", "b", "c", "n", "m")
    assert template_fields("Photo taken {d:%Y-%m-%d}") == ("d",)  # a date column
    with pytest.raises(ValueError, match="positional"):
        template_fields("{0}")
    with pytest.raises(ValueError, match="unknown conversion"):
        template_fields("{prompt!z}")
    with pytest.raises(ValueError, match="invalid format spec ':zz'"):
        template_fields("{a:zz}")
    with pytest.raises(ValueError, match=r"not valid Unicode \(\\udcff\)"):
        template_fields("Caption \udcff {a}")  # a non-UTF-8 byte from the command line


# --- fingerprint -------------------------------------------------------------------------------

MODEL = {"id": "org/model", "revision": "abc", "weights_sha256": "00"}

# Changing any of these changes what is written: the fingerprint must change.
AFFECTING = {
    "model": "org/other",
    "prompt": "Caption {x}",
    "chat": False,
    "id_column": "key",
    "image_column": "picture",
    "prompt_column": "question",
    "keep_columns": ("a",),
    "max_image_pixels": 1000,
    "max_tokens": 9,
    "max_tokens_column": "limit",
    "temperature": 0.7,
    "num_crops": 4,
    "dtype": "float32",
    "quantize": 8,
}
# Changing these changes speed, placement or bookkeeping only.
NOT_AFFECTING = {
    "output": Path("/elsewhere/out.parquet"),
    "batch_size": 3,
    "max_batch_tokens": 99,
    "sort_window": 1,
    "group_images": False,
    "workers": 7,
    "quiet": True,
    "overwrite": True,
    "retry_errors": True,
    "checkpoint_every_rows": 1,
    "checkpoint_every_seconds": 1.0,
    "checkpoint_dir": Path("/elsewhere/ck"),
    "shard": (0, 2),
    # greedy decoding ignores the sampling parameters
    "top_p": 0.5,
    "top_k": 5,
    "seed": 42,
}
SAMPLING = {"top_p": 0.5, "top_k": 5, "seed": 42}


def test_every_field_is_classified() -> None:
    fields = {f.name for f in dataclasses.fields(JobSpec)}
    # input is covered by the input identity, image_root by its own test below
    assert fields == AFFECTING.keys() | NOT_AFFECTING.keys() | {"input", "image_root"}


@pytest.mark.parametrize(("field", "value"), AFFECTING.items())
def test_fingerprint_changes_with_output_affecting_fields(data: Path, field: str, value) -> None:
    spec = spec_for(data)
    identity = input_identity(data)
    changed = dataclasses.replace(spec, **{field: value})
    assert fingerprint(changed, MODEL, identity) != fingerprint(spec, MODEL, identity)
    changes = describe_changes(
        fingerprint_fields(spec, MODEL, identity), fingerprint_fields(changed, MODEL, identity)
    )
    # greedy -> sampling also brings top_p, top_k and seed into play
    assert field in [line.split(":")[0] for line in changes]


def test_limits_may_come_from_the_prompt_column_name_when_a_template_replaces_it(data: Path):
    spec = spec_for(data, prompt="Caption {title}.", max_tokens_column="prompt")
    assert spec.max_tokens_column == "prompt"


def test_fingerprint_without_per_row_limits_is_the_one_before_they_existed(data: Path) -> None:
    """Jobs checkpointed before ``max_tokens_column`` existed resume: unset, it is not hashed."""
    fields = fingerprint_fields(spec_for(data), MODEL, input_identity(data))
    assert "max_tokens_column" not in fields


@pytest.mark.parametrize(("field", "value"), NOT_AFFECTING.items())
def test_fingerprint_ignores_speed_and_bookkeeping(data: Path, field: str, value) -> None:
    spec = spec_for(data)
    identity = input_identity(data)
    changed = dataclasses.replace(spec, **{field: value})
    assert fingerprint(changed, MODEL, identity) == fingerprint(spec, MODEL, identity)


@pytest.mark.parametrize(("field", "value"), SAMPLING.items())
def test_fingerprint_changes_with_sampling_params_when_sampling(data: Path, field, value) -> None:
    spec = spec_for(data, temperature=0.8)
    identity = input_identity(data)
    changed = dataclasses.replace(spec, **{field: value})
    assert fingerprint(changed, MODEL, identity) != fingerprint(spec, MODEL, identity)


def test_fingerprint_changes_with_image_root(data: Path, tmp_path: Path) -> None:
    identity = input_identity(data)
    confined = spec_for(data, image_root=tmp_path)
    assert fingerprint(confined, MODEL, identity) != fingerprint(spec_for(data), MODEL, identity)


def test_fingerprint_changes_with_model_identity(data: Path) -> None:
    spec, identity = spec_for(data), input_identity(data)
    other = {**MODEL, "revision": "def"}
    assert fingerprint(spec, other, identity) != fingerprint(spec, MODEL, identity)
    changes = describe_changes(
        fingerprint_fields(spec, MODEL, identity), fingerprint_fields(spec, other, identity)
    )
    assert changes == ['model_identity.revision: "abc" → "def"']


def test_input_changes_are_told_in_words_not_hashes(data: Path, tmp_path: Path) -> None:
    """A refusal names what changed in the input (its size in bytes, its modification time as
    a time, 'other bytes'), not a SHA-256 or nanoseconds a reader cannot act on."""
    large = tmp_path / "large.jsonl"
    large.write_bytes(b'{"prompt": "p"}\n' * 300_000)  # over 2 MiB: the mtime counts
    os.utime(large, ns=(0, 1_700_000_000 * 10**9))
    spec = spec_for(large)
    before = fingerprint_fields(spec, MODEL, input_identity(large))
    with large.open("ab") as fh:
        fh.write(b'{"prompt": "q"}\n')
    after = fingerprint_fields(spec, MODEL, input_identity(large))
    changes = describe_changes(before, after)
    assert "input.size: 4800000 → 4800016 bytes" in changes, changes
    assert "input content: other bytes than when the job started" in changes, changes
    told = [c for c in changes if c.startswith("input modification time: 2023-11-")]
    assert len(told) == 1 and "not read whole" in told[0], changes
    assert not any(c.startswith("input.sample_sha256") or "_ns" in c for c in changes), changes


def test_a_field_added_later_is_compared_only_where_both_sides_recorded_it(data: Path) -> None:
    """A checkpoint from before the prompt-encoding probe was fingerprinted is the same job;
    two that both recorded it differ when it differs, and the change is told in words."""
    from jobrunner.checkpoint import is_same_job

    spec, source = spec_for(data), input_identity(data)
    new = fingerprint_fields(spec, {**MODEL, "prompt_encoding": "aaaa"}, source)
    old = fingerprint_fields(spec, MODEL, source)
    record = {"fingerprint": "0" * 64, "fingerprint_fields": old}
    assert is_same_job(record, "1" * 64, new, comparable_fields)
    assert describe_changes(old, new, comparable_fields) == []
    other = fingerprint_fields(spec, {**MODEL, "prompt_encoding": "bbbb"}, source)
    record = {"fingerprint": "0" * 64, "fingerprint_fields": other}
    assert not is_same_job(record, "1" * 64, new, comparable_fields)
    (change,) = describe_changes(other, new, comparable_fields)
    assert change.startswith("prompt encoding: the installed libraries"), change


def test_input_identity_sees_same_size_rewrite(data: Path) -> None:
    before = input_identity(data)
    stat = data.stat()
    data.write_text(data.read_text().replace("hi", "ho"))
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime
    after = input_identity(data)
    assert after["size"] == before["size"] and "mtime_ns" not in after  # hashed whole
    assert after["sample_sha256"] != before["sample_sha256"]
    spec = spec_for(data)
    assert fingerprint(spec, MODEL, after) != fingerprint(spec, MODEL, before)


def test_touching_an_input_hashed_whole_is_the_same_job_but_not_a_large_one(
    data: Path, tmp_path: Path
) -> None:
    before = input_identity(data)
    os.utime(data, ns=(0, data.stat().st_mtime_ns + 10**9))
    assert input_identity(data) == before
    big = tmp_path / "big.jsonl"
    big.write_bytes(b"a" * (3 << 20))  # sampled, not hashed whole: the mtime guards its middle
    before = input_identity(big)
    os.utime(big, ns=(0, big.stat().st_mtime_ns + 10**9))
    assert input_identity(big)["mtime_ns"] != before["mtime_ns"]


def test_fields_recorded_by_the_older_fingerprint_compare_as_the_same_job(data: Path) -> None:
    """Until 2026-11-24 the input's mtime was always recorded and spelt-out defaults kept as
    given; ``comparable_fields`` sees such fields as this job's, and no other job's."""
    from jobrunner.spec import comparable_fields

    model = {**MODEL, "default_num_crops": 4, "default_dtype": "float32"}
    now = fingerprint_fields(spec_for(data), model, input_identity(data))
    old = {**now, "num_crops": 4, "dtype": "float32", "input": {**now["input"], "mtime_ns": 1}}
    assert comparable_fields(old) == comparable_fields(now)
    for other in ({**old, "num_crops": 16}, {**old, "max_tokens": 7}):
        assert comparable_fields(other) != comparable_fields(now)
    big = {**now["input"], "size": 3 << 20}  # sampled, not hashed whole: its mtime counts
    assert comparable_fields({**now, "input": {**big, "mtime_ns": 1}}) != comparable_fields(
        {**now, "input": {**big, "mtime_ns": 2}}
    )


def test_spelling_out_the_models_defaults_is_the_same_job(data: Path) -> None:
    model = {**MODEL, "default_num_crops": 4, "default_dtype": "float32"}
    identity = input_identity(data)
    open_ = fingerprint(spec_for(data), model, identity)
    assert fingerprint(spec_for(data, num_crops=4, dtype="float32"), model, identity) == open_
    assert fingerprint(spec_for(data, num_crops=16), model, identity) != open_
    assert fingerprint(spec_for(data, dtype="bfloat16"), model, identity) != open_


def test_input_identity_samples_head_and_tail_of_large_files(tmp_path: Path) -> None:
    big = tmp_path / "big.jsonl"
    big.write_bytes(b"a" * (3 << 20))
    before = input_identity(big)["sample_sha256"]
    with big.open("r+b") as fh:
        fh.seek(-10, os.SEEK_END)
        fh.write(b"b")
    assert input_identity(big)["sample_sha256"] != before


def test_input_modification_time_changed_within_a_second_shows_the_change() -> None:
    """A large input's mtime that changed by less than a second (a copy that kept whole
    seconds only) is told with its fraction: two equal times would say nothing changed."""
    second = 1_700_000_000 * 10**9
    before = {"input": {"path": "/d.jsonl", "size": 3 << 20, "mtime_ns": second + 123_456_789}}
    after = {"input": {"path": "/d.jsonl", "size": 3 << 20, "mtime_ns": second}}
    from jobrunner.spec import comparable_fields

    (change,) = describe_changes(before, after, comparable_fields)
    assert change.startswith("input modification time: "), change
    told = change.split(": ", 1)[1].split(" (")[0]
    old, new = told.split(" → ")
    assert old != new and old.endswith(".123456789") and new.endswith(".000000000"), change
