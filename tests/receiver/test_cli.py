"""The command line of ``pacs-receiver``: --help documents every option; a value that
cannot be used stops the program with exit status 2 and one line on stderr."""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import subprocess
from pathlib import Path

import pytest

from receiver.__main__ import make_parser
from receiver.config import ReceiverConfig

from .conftest import PACS_RECEIVER

TIMEOUT = 30
#: ReceiverConfig fields that are not flags: TOML tables ([identity], [ae-sources]),
#: values derived from --config
FILE_ONLY = {"identity", "config_dir", "ae_sources", "remote_aes"}


def run(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PACS_RECEIVER, *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def test_help_documents_every_option() -> None:
    result = run("--help")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    text = result.stdout
    parser = make_parser()
    options = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    assert options
    for action in options:
        assert action.help and action.help.strip(), f"{action.option_strings} has no help"
        for flag in action.option_strings:
            assert flag in text, f"{flag} missing from --help"
    # Every setting of the configuration is reachable from the command line, but
    # for the config file's tables ([identity]) and what is derived from the file.
    flags = {flag for a in options for flag in a.option_strings}
    for f in dataclasses.fields(ReceiverConfig):
        if f.name in FILE_ONLY:
            continue
        flag = "--handler" if f.name == "handlers" else "--" + f.name.replace("_", "-")
        assert flag in flags, f"setting {f.name} has no flag"
    # ... and the signals and the config file are explained.
    for word in ("SIGTERM", "SIGHUP", "TOML"):
        assert word in text


@pytest.mark.parametrize(
    ("args", "mentions"),
    [
        (["--port", "70000"], "--port"),
        (["--port", "eleven"], "--port"),
        (["--fsync", "sometimes"], "--fsync"),
        (["--ae-title", "A" * 17], "--ae-title"),
        (["--workers", "0"], "--workers"),
        (["--max-pdu", "100"], "--max-pdu"),
        (["--duplicates", "maybe"], "--duplicates"),
        (["--calling-aes", "OK,WAY_TOO_LONG_AE_TITLE"], "--calling-aes"),
        (["--graceful-timeout", "-1"], "--graceful-timeout"),
        (["--min-receive-rate", "-5"], "--min-receive-rate"),
        (["--handler", "EVT_C_ECHO=no.such.module:f"], "--handler"),
        (["--handler", "EVT_C_STORE=no_such_hooks:on_store"], "PYTHONPATH"),
        (["--max-dataset-memory", "100"], "--max-dataset-memory"),
        (["--handler", "EVT_NO_SUCH_EVENT=tests.receiver.hooks:record_pid"], "--handler"),
        (["--config", "/nonexistent/pacsrx.toml"], "--config"),
        (["--commitment-max-references", "0"], "--commitment-max-references"),
        (["--commitment-retry", "0"], "--commitment-retry"),
        (["--query-retrieve", "--index", "off"], "--query-retrieve"),
        (["--no-such-flag"], "--no-such-flag"),
        # S3 settings are checked even with a local --storage, where they are unused
        (["--s3-durability", "fast"], "--s3-"),
        (["--s3-part-size", "1"], "--s3-"),
        (["--s3-spool-limit", "-1"], "--s3-"),
    ],
)
def test_bad_value_exits_2_with_one_line(args: list[str], mentions: str, tmp_path: Path) -> None:
    result = run("--port", "0", "--metrics-port", "0", *args, cwd=tmp_path)
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pacs-receiver: error:"), lines[0]
    assert mentions in lines[0], lines[0]
    assert result.stdout == ""
    # Nothing was started: no store directory was created.
    assert list(tmp_path.iterdir()) == []


def test_bad_config_file_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('ae-title = "PACSRX"\nno-such-setting = 1\n')
    result = run("--config", str(bad), "--metrics-port", "0", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "no-such-setting" in result.stderr
    bad.write_text("workers = [\n")
    result = run("--config", str(bad), "--metrics-port", "0", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "TOML" in result.stderr


@pytest.mark.parametrize(
    "entry",
    [
        'SCU = { host = "127.0.0.1" }',
        'SCU = { host = "127.0.0.1", port = 70000 }',
        'SCU = { host = "", port = 104 }',
        'WAY_TOO_LONG_AE_TITLE = { host = "127.0.0.1", port = 104 }',
        'SCU = "127.0.0.1:104"',
    ],
)
def test_bad_remote_aes_exits_2(entry: str, tmp_path: Path) -> None:
    config = tmp_path / "pacsrx.toml"
    config.write_text(f"[remote-aes]\n{entry}\n")
    result = run("--config", str(config), "--metrics-port", "0", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "[remote-aes]" in result.stderr, result.stderr


def test_port_in_use_exits_2(tmp_path: Path) -> None:
    tmpdir = tmp_path / "tmp"  # where the supervisor makes its runtime directory
    tmpdir.mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run(
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--metrics-port",
            "0",
            "--workers",
            "1",
            "--storage",
            str(tmp_path / "store"),
            cwd=tmp_path,
            env={"TMPDIR": str(tmpdir)},
        )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"pacs-receiver: error: cannot listen on 127.0.0.1:{port}:")
    assert "in use" in lines[0]
    # The runtime directory made for this run was removed again.
    assert list(tmpdir.iterdir()) == []


def test_config_defaults_are_valid() -> None:
    ReceiverConfig().check()
