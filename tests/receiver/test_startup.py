"""Start-up that fails loudly: a store that cannot be written, a metrics port in use,
config file values of the wrong type, each stop ``pacs-receiver`` before it listens
with one line on stderr and exit status 2, and leave nothing behind (no runtime
directory, no store directories made for the attempt). ``--version`` on both
commands."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from receiver import package_version

from .conftest import (
    PACS_RECEIVER,
    Receiver,
    ReceiverFactory,
    associate,
    release,
    scu_ae,
    wait_for,
)

TIMEOUT = 30
PACS_LOADTEST = str(Path(sys.executable).with_name("pacs-loadtest"))


def start(
    tmp_path: Path, *args: str, prefix: list[str] | None = None
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run pacs-receiver to its end (it must not start); returns (result, TMPDIR)."""
    tmpdir = tmp_path / "tmp"  # where the supervisor would make its runtime directory
    tmpdir.mkdir(exist_ok=True)
    cmd = [PACS_RECEIVER, "--host", "127.0.0.1", "--port", "0", "--workers", "1"]
    if "--metrics-port" not in args:
        cmd += ["--metrics-port", "0"]
    result = subprocess.run(
        [*(prefix or []), *cmd, *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        stdin=subprocess.DEVNULL,
        cwd=tmp_path,
        env={**os.environ, "TMPDIR": str(tmpdir)},
    )
    return result, tmpdir


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pacs-receiver: error: "), lines[0]
    assert "listening on" not in result.stdout + result.stderr
    return lines[0]


# ------------------------------------------------------------------ storage


def test_storage_that_is_a_regular_file(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.write_text("not a directory\n")
    result, tmpdir = start(tmp_path, "--storage", str(store))
    line = one_error_line(result)
    assert str(store) in line and "not a directory" in line, line
    assert list(tmpdir.iterdir()) == []


def test_storage_whose_parent_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a directory should be\n")
    store = blocker / "sub" / "store"
    result, tmpdir = start(tmp_path, "--storage", str(store))
    line = one_error_line(result)
    assert str(store) in line and "not a directory" in line, line
    assert "cannot listen" not in line
    assert list(tmpdir.iterdir()) == []


def _unshare_works() -> str | None:
    """Why a private mount namespace with a tmpfs is not available here, or None."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return "unshare/mount not installed"
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o ro,size=1m tmpfs /mnt"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    if probe.returncode != 0:
        return f"cannot mount a tmpfs in a private mount namespace: {probe.stderr.strip()}"
    return None


@pytest.mark.parametrize("existing", [True, False], ids=["store-exists", "store-missing"])
def test_storage_on_a_read_only_mount(tmp_path: Path, existing: bool) -> None:
    """Tests run as root, for whom a chmod'ed directory is still writable: the
    store is on a tmpfs mounted read-only in a private mount namespace, the way a
    store mounted read-only (or remounted so after an error) looks to the receiver."""
    why_not = _unshare_works()
    if why_not is not None:
        pytest.skip(why_not)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    store = mnt / "store"
    # rw first so that the store (and its temp directory) can exist, then read-only.
    setup = f"mount -t tmpfs -o size=4m tmpfs {mnt}"
    if existing:
        setup += f" && mkdir -p {store}/.incoming"
    setup += f' && mount -o remount,ro {mnt} && exec "$@"'
    result, tmpdir = start(
        tmp_path, "--storage", str(store), prefix=["unshare", "-m", "sh", "-c", setup, "sh"]
    )
    line = one_error_line(result)
    assert str(store) in line and "Read-only file system" in line, line
    assert list(tmpdir.iterdir()) == []


# ------------------------------------------------------------------ ports


def test_metrics_port_in_use(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result, tmpdir = start(tmp_path, "--metrics-port", str(port), "--storage", str(store))
    line = one_error_line(result)
    assert f"127.0.0.1:{port}" in line and "metrics" in line and "in use" in line, line
    # Nothing left behind: no runtime directory (with its metrics socket), and not
    # even the store directory that was created to check it could be written.
    assert list(tmpdir.iterdir()) == []
    assert not store.exists()


def test_metrics_port_in_use_with_metrics_optional(
    receiver_factory: ReceiverFactory, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        rx = receiver_factory("--workers", "1", "--metrics-port", str(port), "--metrics-optional")
        rx.wait_log(rf"cannot serve metrics on 127\.0\.0\.1:{port}: .*running WITHOUT metrics")
        # No aggregator was started (it would fail on the port, again and again), and
        # the receiver serves.
        assert "metrics aggregator started" not in rx.log()
        assoc = associate(rx, scu_ae("OPTIONAL"))
        try:
            assert assoc.is_established
            assert assoc.send_c_echo().Status == 0x0000
        finally:
            release(assoc)


def test_dicom_port_in_use_leaves_no_store_behind(tmp_path: Path) -> None:
    store = tmp_path / "a" / "b" / "store"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result, tmpdir = start(tmp_path, "--storage", str(store), "--port", str(port))
    line = one_error_line(result)
    assert line.startswith(f"pacs-receiver: error: cannot listen on 127.0.0.1:{port}:"), line
    assert list(tmpdir.iterdir()) == []
    assert not (tmp_path / "a").exists()


def test_failed_start_keeps_an_existing_store(tmp_path: Path) -> None:
    """Undoing a failed start removes only what that start made."""
    store = tmp_path / "store"
    (store / "1.2.3").mkdir(parents=True)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result, _tmpdir = start(tmp_path, "--storage", str(store), "--metrics-port", str(port))
    one_error_line(result)
    assert (store / "1.2.3").is_dir()


# ------------------------------------------------------------------ config file


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ('port = "11112"\n', "port", "string"),
        ("workers = 2.5\n", "workers", "integer"),
        ('require-called-ae = "yes"\n', "require-called-ae", "boolean"),
        ("calling-aes = [1, 2]\n", "calling-aes", "strings"),
        ("ae-title = 5\n", "ae-title", "string"),
        ("[receiver]\nacse-timeout = true\n", "acse-timeout", "number"),
        # A value of the right type that the checks refuse names the file too.
        ("graceful-timeout = -1\n", "graceful-timeout", "positive"),
        ("max_pdu = 100\n", "max_pdu", "4096"),
    ],
)
def test_config_file_value_of_the_wrong_type(
    tmp_path: Path, text: str, key: str, words: str
) -> None:
    config = tmp_path / "rx.toml"
    config.write_text(text)
    result, tmpdir = start(tmp_path, "--config", str(config), "--storage", str(tmp_path / "s"))
    line = one_error_line(result)
    assert str(config) in line and f": {key}:" in line and words in line, line
    assert list(tmpdir.iterdir()) == []
    assert not (tmp_path / "s").exists()


def test_flag_overrides_a_bad_file_value_and_is_blamed_itself(tmp_path: Path) -> None:
    config = tmp_path / "rx.toml"
    config.write_text("workers = 0\n")
    result, _ = start(tmp_path, "--config", str(config), "--max-pdu", "100")
    line = one_error_line(result)
    # --workers 1 (given by start()) wins over the file; --max-pdu is the flag's fault.
    assert line.startswith("pacs-receiver: error: --max-pdu:"), line


# ------------------------------------------------------------------ --version


@pytest.mark.parametrize("command", [PACS_RECEIVER, PACS_LOADTEST], ids=["receiver", "loadtest"])
def test_version(command: str) -> None:
    result = subprocess.run(
        [command, "--version"], capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    assert result.returncode == 0, result.stderr
    name = Path(command).name
    # pacs-receiver also names the data plane that runs (compiled or pure)
    assert result.stdout.strip().startswith(f"{name} {package_version()}")
    assert package_version() != "unknown"


# ------------------------------------------------------------------ SIGHUP


class _ConfigOnlyReceiver(Receiver):
    """A receiver whose store and metrics port come from its --config file alone."""

    def __init__(self, base: Path, config: Path) -> None:
        super().__init__(base, [], None)
        self.config = config

    def command(self) -> list[str]:
        cmd = [PACS_RECEIVER, "--host", "127.0.0.1", "--port", "0", "--fsync", "never"]
        return [*cmd, "--workers", "1", "--config", str(self.config)]


def _scrape(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as rsp:
            return b"pacs_" in rsp.read()
    except OSError:
        return False


def test_sighup_checks_store_and_metrics_port_like_start_up(tmp_path: Path) -> None:
    store = tmp_path / "store"
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x\n")
    config = tmp_path / "rx.toml"
    first, later = free_port(), free_port()

    def write(storage: Path, metrics: int) -> None:
        config.write_text(f'storage = "{storage}"\nmetrics-port = {metrics}\n')

    write(store, first)
    base = tmp_path / "rx"
    base.mkdir()
    rx = _ConfigOnlyReceiver(base, config)
    try:
        rx.start(workers_ready=1)
        wait_for(lambda: _scrape(first), 20, what="metrics on the first port")
        # A store that cannot be written: the configuration is not taken.
        write(not_a_dir, first)
        rx.signal(signal.SIGHUP)
        rx.wait_log(rf"SIGHUP: configuration not reloaded: storage {not_a_dir}: .*not a directory")
        # A metrics port in use: said so, the old one kept.
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            busy = taken.getsockname()[1]
            write(store, busy)
            rx.signal(signal.SIGHUP)
            rx.wait_log(rf"cannot serve metrics on 127\.0\.0\.1:{busy}: .*metrics stay on")
            wait_for(lambda: _scrape(first), 20, what="metrics still on the first port")
        # A free one: the aggregator moves there.
        write(store, later)
        rx.signal(signal.SIGHUP)
        wait_for(lambda: _scrape(later), 20, what="metrics on the new port")
        wait_for(lambda: not _scrape(first), 20, what="the first port closed")
        assert "Traceback" not in rx.log()
    finally:
        rx.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
