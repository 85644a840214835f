"""Configuration loading: valid files load, every kind of bad file fails with the key path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from specfleet.core.config import SpecFleetConfig, load_config
from specfleet.core.typed_yaml import ConfigError, to_plain

REPO = Path(__file__).resolve().parents[2]
MINIMAL = """\
models:
  target: zoo:tiny/target
drafters:
  - name: ngram
    kind: ngram
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["local.yaml", "tiny.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / name)
    assert isinstance(cfg, SpecFleetConfig)
    assert cfg.server.host == "127.0.0.1"  # loopback by default


def test_defaults_are_filled(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.verifier.tp_size == 1 and cfg.verifier.device == "cpu"
    assert cfg.drafters[0].resources.torch_threads == 1
    assert to_plain(cfg)["scheduler"]["draft_length"] == 4


def test_config_is_frozen(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    with pytest.raises(AttributeError):
        cfg.verifier.tp_size = 2  # type: ignore[misc]


BAD_CASES = {
    "unknown top-level key": (MINIMAL + "verifyer:\n  tp_size: 2\n", "verifyer: unknown key"),
    "unknown nested key": (MINIMAL + "verifier:\n  tp_sise: 2\n", "verifier.tp_sise: unknown key"),
    "missing required key": ("drafters:\n  - {name: a, kind: ngram}\n", "models: missing required key"),
    "missing nested required": (
        "models: {}\ndrafters:\n  - {name: a, kind: ngram}\n",
        "models.target: missing required key",
    ),
    "wrong type": (
        MINIMAL + "verifier:\n  tp_size: two\n",
        "verifier.tp_size: expected int, got 'two'",
    ),
    "bool is not int": (MINIMAL + "verifier:\n  count: true\n", "verifier.count: expected int"),
    "bad enum": (
        MINIMAL + "verifier:\n  device: tpu\n",
        "verifier.device: expected one of 'cpu', 'cuda', got 'tpu'",
    ),
    "bad enum in list": (
        "models: {target: x}\ndrafters:\n  - {name: a, kind: magic}\n",
        "drafters[0].kind: expected one of",
    ),
    "negative count": (MINIMAL + "verifier:\n  count: -1\n", "verifier.count: must be >= 1, got -1"),
    "negative resource": (
        "models: {target: x}\ndrafters:\n  - {name: a, kind: ngram, resources: {num_cpus: -2}}\n",
        "drafters[0].resources.num_cpus: must be >= 0",
    ),
    "malformed yaml": ("models:\n  target: [unclosed\n", "line 3"),
    "list expected": ("models: {target: x}\ndrafters: ngram\n", "drafters: expected a list"),
    "model drafter without model": (
        "models: {target: x}\ndrafters:\n  - {name: a, kind: model}\n",
        "drafters[0]: drafter 'a': kind 'model' needs a 'model' path",
    ),
    "duplicate drafter names": (
        "models: {target: x}\ndrafters:\n  - {name: a, kind: ngram}\n  - {name: a, kind: suffix}\n",
        "duplicate name 'a'",
    ),
    "unknown default drafter": (
        MINIMAL + "router:\n  default_drafter: nope\n",
        "router.default_drafter: 'nope' is not a drafter name",
    ),
    "top level not a mapping": ("- 1\n- 2\n", "<top level>: expected a mapping"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_config_names_file_and_key(tmp_path, case):
    text, expected = BAD_CASES[case]
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert expected in message, message


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "specfleet.core.cli", *args], capture_output=True, text=True
    )


def test_cli_validate_ok():
    result = run_cli("config", "validate", str(REPO / "configs" / "local.yaml"))
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout and result.stdout.count("\n") == 1


def test_cli_validate_bad_exits_2(tmp_path):
    path = write(tmp_path, MINIMAL + "verifier:\n  tp_size: two\n")
    result = run_cli("config", "validate", str(path))
    assert result.returncode == 2
    assert "verifier.tp_size: expected int, got 'two'" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_show_prints_resolved_yaml(tmp_path):
    import yaml

    result = run_cli("config", "show", str(write(tmp_path, MINIMAL)))
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["verifier"]["max_seq_len"] is None  # from the checkpoint at start-up
    assert shown["verifier"]["kv_cache_mb"] == 4096
    # what `show` prints is itself a valid config that loads to the same thing
    assert load_config(write(tmp_path, result.stdout)) == load_config(write(tmp_path, MINIMAL))


@pytest.mark.parametrize("argv", [["--help"], ["config", "--help"], ["config", "validate", "--help"]])
def test_help_everywhere(argv):
    result = run_cli(*argv)
    assert result.returncode == 0 and "usage" in result.stdout


def test_configuration_reference_is_current():
    from specfleet.core.config_reference import render

    committed = (REPO / "docs" / "configuration.md").read_text()
    assert committed == render(), "run: python -m specfleet.core.config_reference > docs/configuration.md"


def test_frontend_ports_must_not_clash(tmp_path):
    path = write(tmp_path, MINIMAL + "server:\n  port: 8000\n  http_port: 8000\n")
    with pytest.raises(ConfigError, match="server.http_port: 8000 is also server.port"):
        load_config(path)
    # 0 (a free port each) and unset (off) never clash.
    cfg = load_config(write(tmp_path, MINIMAL + "server:\n  port: 0\n  http_port: 0\n  metrics_port: 0\n"))
    assert (cfg.server.http_port, cfg.server.metrics_port) == (0, 0)
