"""The qcore command, run through the installed console script and through main().

Backends reach the console script the way pip installs them: a dist-info directory with an
entry_points.txt on the subprocess' sys.path, found by importlib.metadata. One of them imports the
in-test int8 backend, another one fails to import.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import qcore
from helpers.int8_backend import BACKEND, Int8TestConfig, Int8TestQuantizer
from helpers.models import TinyTransformer, flux_inputs, make_tiny, tiny_flux_config
from qcore.cli import build_parser, main

TESTS_DIR = Path(__file__).parent
TINY = "helpers.models:TinyTransformer"


def qcore_script() -> str:
    script = shutil.which("qcore", path=str(Path(sys.executable).parent)) or shutil.which("qcore")
    assert script, "the qcore console script is not installed (pip install ./core)"
    return script


def _write_dist(site: Path, name: str, version: str, entry_points: dict[str, str]) -> None:
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = ["[qcore.backends]", *(f"{k} = {v}" for k, v in entry_points.items())]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site directory holding two installed backend distributions: one good, one broken."""
    site = tmp_path_factory.mktemp("site")
    _write_dist(site, "qcore-int8-test", "0.3.1", {"int8-test": "helpers.int8_backend:BACKEND"})
    _write_dist(site, "qcore-broken", "0.2.0", {"broken-test": "qcore_broken_plugin:BACKEND"})
    (site / "qcore_broken_plugin.py").write_text(
        'raise ImportError("libbroken.so not found: install broken-runtime")\n'
    )
    return site


def quantize_argv(source: Path, target: Path, *options: str, method: str = "int8-test") -> list[str]:
    """``qcore quantize`` of the tiny test model from ``source`` to ``target`` with the backend ``method``."""
    return ["quantize", str(source), str(target), "--method", method, "--model", TINY, *options]


def run_qcore(
    *args: str, site: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("QCORE_")}
    paths = [str(site)] if site else []
    full_env["PYTHONPATH"] = os.pathsep.join([*paths, str(TESTS_DIR)])
    full_env.update(env or {})
    return subprocess.run([qcore_script(), *args], capture_output=True, text=True, env=full_env, timeout=300)


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("qcore: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


# --- qcore backends -----------------------------------------------------------------------------


def test_backends_reports_installed_ok_and_failed_distributions(plugin_site: Path) -> None:
    result = run_qcore("backends", "--json", site=plugin_site)
    assert result.returncode == 0, result.stderr
    rows = {row["quant_method"]: row for row in json.loads(result.stdout)}
    assert rows["int8-test"] == {
        "quant_method": "int8-test",
        "distribution": "qcore-int8-test",
        "version": "0.3.1",
        "status": "ok",
        "config_class": "helpers.int8_backend.Int8TestConfig",
        "error": None,
    }
    broken = rows["broken-test"]
    assert broken["status"] == "failed" and broken["distribution"] == "qcore-broken"
    assert "libbroken.so not found" in broken["error"] and "qcore-broken" in broken["error"]

    table = run_qcore("backends", site=plugin_site)
    assert table.returncode == 0
    line = next(line for line in table.stdout.splitlines() if line.startswith("int8-test "))
    assert line.split()[:5] == [
        "int8-test",
        "qcore-int8-test",
        "0.3.1",
        "helpers.int8_backend.Int8TestConfig",
        "ok",
    ]
    line = next(line for line in table.stdout.splitlines() if line.startswith("broken-test "))
    assert "failed: " in line and "libbroken.so not found" in line

    checked = run_qcore("backends", "--check", site=plugin_site)
    assert checked.returncode == 1
    assert "broken-test" in error_line(checked.stderr)


def test_backends_honours_allow_list_and_autoload_switch(plugin_site: Path) -> None:
    allowed = run_qcore("backends", "--json", site=plugin_site, env={"QCORE_PLUGINS": "qcore-int8-test"})
    rows = {row["quant_method"]: row for row in json.loads(allowed.stdout)}
    assert rows["int8-test"]["status"] == "ok"
    assert rows["broken-test"]["status"] == "disabled"
    assert "QCORE_PLUGINS" in rows["broken-test"]["error"]

    off = run_qcore("backends", "--json", site=plugin_site, env={"QCORE_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert off.returncode == 0
    assert json.loads(off.stdout) == []
    empty = run_qcore("backends", site=plugin_site, env={"QCORE_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert "No quantization backend is installed" in empty.stdout


def test_backends_lists_in_process_registration(
    int8_backend: qcore.Backend, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["backends", "--json"]) == 0
    rows = {row["quant_method"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["int8-test"]["distribution"] is None
    assert rows["int8-test"]["status"] == "ok"


# --- qcore quantize + inspect through the console script ----------------------------------------


def test_quantize_inspect_and_load_through_console_script(
    plugin_site: Path, tiny_ckpt: Path, tiny_input: torch.Tensor, tmp_path: Path
) -> None:
    dst = tmp_path / "tiny-int8"
    result = run_qcore(
        *quantize_argv(tiny_ckpt, dst),
        "--set",
        "compute_dtype=bfloat16",
        "--set",
        'modules_to_not_convert=["proj_out"]',
        "--max-shard-size",
        "20KB",
        site=plugin_site,
    )
    assert result.returncode == 0, result.stderr
    assert f"saved {dst}" in result.stdout
    written = json.loads((dst / "config.json").read_text())
    assert written["quantization_config"] == {
        "quant_method": "int8-test",
        "compute_dtype": "bfloat16",
        "modules_to_not_convert": ["proj_out"],
    }
    shards = sorted(dst.glob("*.safetensors"))
    assert len(shards) > 1 and (dst / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert not [p for p in tmp_path.iterdir() if "qcore-tmp" in p.name]

    inspected = run_qcore("inspect", str(dst), "--json", site=plugin_site)
    assert inspected.returncode == 0, inspected.stderr
    info = json.loads(inspected.stdout)
    assert info["quant_method"] == "int8-test"
    assert info["class_name"] == "TinyTransformer"
    assert info["pre_quantization_dtype"] == "bfloat16"
    assert info["load"]["loadable"] and info["load"]["distribution"] == "qcore-int8-test"
    assert info["index"] == "diffusion_pytorch_model.safetensors.index.json"
    assert [s["name"] for s in info["shards"]] == [p.name for p in shards]
    # The header-only figures agree with the tensors themselves.
    by_dtype: dict[str, list[int]] = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                total = by_dtype.setdefault(str(t.dtype).removeprefix("torch."), [0, 0, 0])
                total[0] += 1
                total[1] += t.numel()
                total[2] += t.numel() * t.element_size()
    assert {k: [v["tensors"], v["elements"], v["bytes"]] for k, v in info["dtypes"].items()} == by_dtype
    assert info["parameters"] == sum(v[1] for v in by_dtype.values())
    assert set(by_dtype) == {"int8", "float32", "bfloat16"}

    text = run_qcore("inspect", str(dst), site=plugin_site)
    assert text.returncode == 0
    assert (
        "quantization  int8-test" in text.stdout and "backend       ok: qcore-int8-test 0.3.1" in text.stdout
    )

    # The written checkpoint loads pre-quantized and matches a quantize-on-load in this process.
    qcore.register_backend(BACKEND)
    try:
        reloaded = TinyTransformer.from_pretrained(dst)
        on_load = TinyTransformer.from_pretrained(
            tiny_ckpt, quantization_config=Int8TestConfig(modules_to_not_convert=["proj_out"])
        )
    finally:
        qcore.unregister_backend("int8-test")
    assert reloaded.hf_quantizer.pre_quantized
    assert isinstance(reloaded.proj_out, torch.nn.Linear)
    assert torch.equal(reloaded(tiny_input), on_load(tiny_input))


def test_inspect_without_backend_fails_with_install_hint(
    plugin_site: Path, tiny_ckpt: Path, tmp_path: Path
) -> None:
    dst = tmp_path / "q"
    qcore.register_backend(BACKEND)
    try:
        assert main(quantize_argv(tiny_ckpt, dst)) == 0
    finally:
        qcore.unregister_backend("int8-test")
    result = run_qcore("inspect", str(dst))  # no site: the backend is not installed
    assert result.returncode == 1
    assert "NOT LOADABLE" in result.stdout and "install: pip install qcore-int8-test" in result.stdout
    line = error_line(result.stderr)
    assert (
        str(dst) in line and "'int8-test' is not installed" in line and "pip install qcore-int8-test" in line
    )
    assert "Traceback" not in result.stderr

    as_json = run_qcore("inspect", str(dst), "--json")
    assert as_json.returncode == 1
    load = json.loads(as_json.stdout)["load"]
    assert load["loadable"] is False and load["install_hint"].startswith("pip install qcore-int8-test")

    failing = run_qcore("inspect", str(dst), site=plugin_site, env={"QCORE_PLUGINS": "broken-test"})
    assert failing.returncode == 1
    assert "not in QCORE_PLUGINS" in error_line(failing.stderr)


def test_inspect_hub_id_from_the_local_cache(plugin_site: Path, tiny_ckpt: Path, tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny-pipe" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_ckpt, snapshot / "transformer")
    (cache / "models--acme--tiny-pipe" / "refs").mkdir()
    (cache / "models--acme--tiny-pipe" / "refs" / "main").write_text("a" * 40)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    result = run_qcore(
        "inspect", "acme/tiny-pipe", "--subfolder", "transformer", "--json", site=plugin_site, env=env
    )
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["quant_method"] is None and info["load"]["loadable"]
    assert info["dtypes"]["bfloat16"]["elements"] == sum(p.numel() for p in TinyTransformer().parameters())

    missing = run_qcore("inspect", "acme/tiny-pipe", "--subfolder", "vae", site=plugin_site, env=env)
    assert missing.returncode == 1
    assert "vae" in error_line(missing.stderr)


def test_help_explains_every_option() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0])))
    # Every run of the console script starts at once: each spends its time importing torch.
    argvs = {name: [name, "--help"] for name in commands.choices} | {"": ["--help"], "version": ["--version"]}
    children = {
        name: subprocess.Popen([qcore_script(), *argv], stdout=subprocess.PIPE, text=True)
        for name, argv in argvs.items()
    }
    stdout = {name: child.communicate(timeout=120)[0] for name, child in children.items()}
    for name, sub in commands.choices.items():
        assert children[name].returncode == 0
        for action in sub._actions:
            assert action.help, f"qcore {name}: {action.dest} has no help"
            label = action.option_strings[-1] if action.option_strings else (action.metavar or action.dest)
            assert label in stdout[name], f"qcore {name} --help does not show {label}"
    assert "exit codes" in stdout[""] and all(name in stdout[""] for name in commands.choices)
    assert stdout["version"].strip() == f"qcore {qcore.__version__}"


# --- quantize: diffusers class detection --------------------------------------------------------


def test_quantize_detects_diffusers_class(
    int8_backend: qcore.Backend, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    src = tmp_path / "flux-bf16"
    FluxTransformer2DModel(**tiny_flux_config()).to(torch.bfloat16).save_pretrained(src)
    dst = tmp_path / "flux-int8"
    assert main(["quantize", str(src), str(dst), "--method", "int8-test", "--torch-dtype", "bfloat16"]) == 0
    assert "(FluxTransformer2DModel)" in capsys.readouterr().err
    written = json.loads((dst / "config.json").read_text())
    assert written["_class_name"] == "FluxTransformer2DModel"
    assert written["quantization_config"]["quant_method"] == "int8-test"

    reloaded = qcore.from_pretrained(FluxTransformer2DModel, dst)
    on_load = qcore.from_pretrained(FluxTransformer2DModel, src, quantization_config=Int8TestConfig())
    inputs = flux_inputs()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs)[0], on_load(**inputs)[0])


# --- quantize: the dtype of the parameters left unquantized --------------------------------------

# --method -> (the backend's module, its --set options). Given no torch_dtype, bitsandbytes loads in
# float16 and torchao in bfloat16; each runs on both sources, so each meets a source it would change.
INSTALLED_BACKENDS = {
    "bitsandbytes": ("qcore_bnb", ["--set", "load_in_4bit=true"]),
    "torchao": ("qcore_torchao", ["--set", "quant_type=int8wo"]),
}


def _read_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in checkpoint.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})
    return tensors


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("method", list(INSTALLED_BACKENDS))
def test_quantize_keeps_the_source_dtype_unless_told(method: str, dtype: torch.dtype, tmp_path: Path) -> None:
    module, options = INSTALLED_BACKENDS[method]
    pytest.importorskip(module)
    src = tmp_path / "src"
    qcore.save_pretrained(make_tiny(dtype=dtype), src)
    assert main(quantize_argv(src, tmp_path / "default", *options, method=method)) == 0
    told = [*options, "--torch-dtype", "float32"]
    assert main(quantize_argv(src, tmp_path / "float32", *told, method=method)) == 0

    source = _read_tensors(src)
    for dst, expected in ((tmp_path / "default", dtype), (tmp_path / "float32", torch.float32)):
        written = _read_tensors(dst)
        # What the backend did not quantize keeps its key; the quantized weights are integers.
        kept = {key: t.dtype for key, t in written.items() if key in source and t.dtype.is_floating_point}
        assert {key for key in source if key.endswith(".bias")} <= set(kept)
        assert set(kept.values()) == {expected}, (dst.name, kept)
        config = json.loads((dst / "config.json").read_text())
        assert config["quantization_config"]["quant_method"] == method


# --- errors and exit codes ----------------------------------------------------------------------


def _strip_class_name(ckpt: Path) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    del config["_class_name"]
    (ckpt / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("argv", "code", "needles"),
    [
        (
            ["quantize", "{src}", "{dst}", "--method", "int8-test", "--set", "compute_dtype"],
            2,
            ["--set 'compute_dtype'", "KEY=VALUE"],
        ),
        (
            ["quantize", "{src}", "{dst}", "--method", "int8-test", "--torch-dtype", "bf16"],
            2,
            ["--torch-dtype 'bf16'"],
        ),
        (
            ["quantize", "{src}", "{dst}", "--method", "int8-test", "--model", "helpers.models"],
            2,
            ["MODULE:CLASS"],
        ),
        (["quantize", "{src}", "{dst}"], 2, []),
        (["frobnicate"], 2, []),
        (
            ["quantize", "{src}", "{dst}", "--method", "nope"],
            1,
            ["'nope' is not installed", "pip install qcore-nope"],
        ),
        (
            ["quantize", "{src}", "{dst}", "--method", "int8-test", "--set", "compute_dtype=int4"],
            1,
            ["compute_dtype", "int4"],
        ),
        (
            ["quantize", "{src}", "{dst}", "--method", "int8-test", "--set", "group_size=64"],
            1,
            ["group_size", "Int8TestConfig"],
        ),
        (
            ["quantize", "{src}", "{dst}", "--method", "int8-test", "--model", "no_such_pkg:Net"],
            1,
            ["no_such_pkg"],
        ),
        (["quantize", "{src}", "{dst}", "--method", "int8-test"], 1, ["'TinyTransformer'", "--model"]),
        (["quantize", "{tmp}/absent", "{dst}", "--method", "int8-test"], 1, ["absent"]),
        (["inspect", "{tmp}/absent"], 1, ["absent"]),
        (["inspect", "{src}", "--subfolder", "transformer"], 1, ["subfolder 'transformer'"]),
    ],
)
def test_errors_exit_codes_and_messages(
    int8_backend: qcore.Backend,
    tiny_ckpt: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    code: int,
    needles: list[str],
) -> None:
    dst = tmp_path / "out"
    args = [a.format(src=tiny_ckpt, dst=dst, tmp=tmp_path) for a in argv]
    assert main(args) == code
    err = capsys.readouterr().err
    if code == 1 or needles:
        line = error_line(err)
        for needle in needles:
            assert needle in line
    assert "Traceback" not in err
    assert not dst.exists()


def test_quantize_refuses_existing_output_and_quantized_source(
    int8_backend: qcore.Backend, tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dst = tmp_path / "q"
    assert main(quantize_argv(tiny_ckpt, dst)) == 0
    before = (dst / "diffusion_pytorch_model.safetensors").read_bytes()
    (dst / "README.md").write_text("kept")
    capsys.readouterr()

    assert main([*quantize_argv(tiny_ckpt, dst), "--set", "compute_dtype=float32"]) == 1
    assert "--overwrite" in error_line(capsys.readouterr().err)
    assert (dst / "diffusion_pytorch_model.safetensors").read_bytes() == before

    assert main(quantize_argv(dst, tmp_path / "again")) == 1
    assert "already quantized (quant_method 'int8-test')" in error_line(capsys.readouterr().err)

    assert main(quantize_argv(tiny_ckpt, dst, "--set", "compute_dtype=float32", "--overwrite")) == 0
    assert json.loads((dst / "config.json").read_text())["quantization_config"]["compute_dtype"] == "float32"
    assert (dst / "README.md").read_text() == "kept"


def test_quantize_without_class_name_asks_for_model(
    int8_backend: qcore.Backend, tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _strip_class_name(tiny_ckpt)
    assert main(["quantize", str(tiny_ckpt), str(tmp_path / "q"), "--method", "int8-test"]) == 1
    assert "no _class_name; pass the model class with --model" in error_line(capsys.readouterr().err)


def test_inspect_corrupt_weights_names_the_file(tiny_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = tiny_ckpt / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"\xff" * 8 + weights.read_bytes()[8:64])
    assert main(["inspect", str(tiny_ckpt)]) == 1
    line = error_line(capsys.readouterr().err)
    assert str(weights) in line and "not a valid safetensors file" in line


class _BoomConfig(Int8TestConfig):
    quant_method = "int8-boom"


class _BoomQuantizer(Int8TestQuantizer):
    @qcore.hookimpl
    def postprocess_model(self, model: torch.nn.Module) -> None:
        raise RuntimeError("boom in postprocess_model")


@pytest.fixture
def boom_backend() -> Iterator[None]:
    qcore.register_backend(qcore.Backend("int8-boom", _BoomConfig, _BoomQuantizer))
    try:
        yield
    finally:
        qcore.unregister_backend("int8-boom")


def test_unexpected_backend_error_exits_3_and_debug_shows_traceback(
    boom_backend: None, tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = quantize_argv(tiny_ckpt, tmp_path / "q", method="int8-boom")
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert "unexpected RuntimeError: boom in postprocess_model (rerun with --debug" in error_line(err)
    assert "Traceback" not in err
    assert main([*argv, "--debug"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and "boom in postprocess_model" in err
    assert not (tmp_path / "q").exists()


def test_set_values_are_json_or_strings() -> None:
    from qcore.cli import parse_settings

    assert parse_settings(["a=1", "b=true", "c=bfloat16", 'd=["x", "y"]', "e=", "f=a=b", "g=null"]) == {
        "a": 1,
        "b": True,
        "c": "bfloat16",
        "d": ["x", "y"],
        "e": "",
        "f": "a=b",
        "g": None,
    }


def test_file_system_errors_exit_1_naming_the_path(
    int8_backend: qcore.Backend, tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a directory should be")
    argv = ["quantize", str(tiny_ckpt), str(blocker / "out"), "--method", "int8-test"]
    assert main([*argv, "--model", "helpers.models:TinyTransformer"]) == 1
    assert "blocker" in error_line(capsys.readouterr().err)


class _DiskFullQuantizer(Int8TestQuantizer):
    @qcore.hookimpl
    def postprocess_model(self, model: torch.nn.Module) -> None:
        # A full disk cannot be caused for real in a test: raise what the OS would.
        raise OSError(28, "No space left on device", "/var/cache/qcore-scratch")


class _DiskFullConfig(Int8TestConfig):
    quant_method = "int8-diskfull"


def test_os_errors_are_environment_errors_not_bugs(
    tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    qcore.register_backend(qcore.Backend("int8-diskfull", _DiskFullConfig, _DiskFullQuantizer))
    try:
        argv = ["quantize", str(tiny_ckpt), str(tmp_path / "q"), "--method", "int8-diskfull"]
        assert main([*argv, "--model", "helpers.models:TinyTransformer"]) == 1
    finally:
        qcore.unregister_backend("int8-diskfull")
    line = error_line(capsys.readouterr().err)
    assert "/var/cache/qcore-scratch: No space left on device" in line


def test_checkpoint_strings_are_printed_escaped(tiny_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = json.loads((tiny_ckpt / "config.json").read_text())
    config["_class_name"] = "Tiny\x1b[2J\x1b[31mTransformer"
    config["quantization_config"] = {"quant_method": "evil\x1b]0;pwned\x07", "note\x1b[1m": "\u202eabc"}
    (tiny_ckpt / "config.json").write_text(json.dumps(config))
    assert main(["inspect", str(tiny_ckpt)]) == 1
    out, err = capsys.readouterr()
    assert not [ch for ch in out + err if not ch.isprintable() and ch != "\n"]
    assert "Tiny\\x1b[2J\\x1b[31mTransformer" in out and "evil\\x1b]0;pwned\\x07" in out
    assert "pip install" not in out + err  # not a distribution name: no command to run


def test_inspect_a_single_weight_file(tiny_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = tiny_ckpt / "diffusion_pytorch_model.safetensors"
    assert main(["inspect", str(weights), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["shards"][0]["name"] == weights.name and info["quant_method"] is None
    assert info["parameters"] == sum(p.numel() for p in TinyTransformer().parameters())

    blob = weights.read_bytes()
    weights.write_bytes(blob[:-10])  # the last tensor now ends past the end of the file
    assert main(["inspect", str(weights)]) == 1
    line = error_line(capsys.readouterr().err)
    assert str(weights) in line and "past the end" in line
