"""The parts of deploy/cluster.py: each a child process with its log, started,
waited for (every wait bounded) and stopped.

:class:`Node` is one pacs-receiver, :class:`Moto` the S3 API server, :class:`HAProxy`
and :class:`Prometheus` render their deploy/ templates (:func:`render`) into the work
directory. PostgreSQL comes from tests/pgserver.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any

DEPLOY = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
BUCKET = "pacs"
PREFIX = "cluster"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "cluster",
    "AWS_SECRET_ACCESS_KEY": "cluster",
    "AWS_DEFAULT_REGION": "us-east-1",
}
#: HAProxy's connections to the nodes come from this address (any of 127/8 is
#: loopback): a node that sees it instead of the client's did not get the PROXY header.
BALANCER_SOURCE = "127.0.0.3"

__all__ = [
    "HAProxy",
    "Moto",
    "Node",
    "Prometheus",
    "Service",
    "free_port",
    "haproxy_binary",
    "render",
    "wait_for",
]


# ------------------------------------------------------------------------ helpers


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` until it returns something true; raise after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


def render(template: str, **values: str) -> str:
    """deploy/<template> with its ``${...}`` fields filled (all must be given)."""
    return Template((DEPLOY / template).read_text()).substitute(values)


def haproxy_binary() -> str | None:
    """HAProxy's path: Debian installs it in /usr/sbin, not on a user's PATH."""
    return shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """(status, body) of a GET; status 0 when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as rsp:
            return int(rsp.status), bytes(rsp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), b""
    except OSError:
        return 0, b""


@dataclass
class Service:
    """One child process with its output in a log file."""

    name: str
    cmd: list[str]
    log: Path
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Service:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # the caller's Ctrl-C is the caller's
            )
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check(self) -> bool:
        """True while running; raises with the end of the log once it has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{tail}")
        return True

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        return proc.returncode


# -------------------------------------------------------------------- components


@dataclass
class Node:
    """One ``pacs-receiver`` (supervisor, workers, metrics aggregator)."""

    name: str
    base: Path
    args: list[str]
    port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    service: Service | None = None

    @property
    def log(self) -> Path:
        return self.base / "receiver.log"

    @property
    def spool(self) -> Path:
        return self.base / "spool"

    def start(self, env: dict[str, str], workers: int, timeout: float = 60.0) -> Node:
        self.base.mkdir(parents=True, exist_ok=True)
        if self.log.exists():  # a restart: keep the earlier run's log beside
            self.log.rename(self.log.with_suffix(f".{time.monotonic_ns()}.log"))
        cmd = [
            str(BIN / "pacs-receiver"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--metrics-host",
            "127.0.0.1",
            "--metrics-port",
            str(self.metrics_port),
            "--workers",
            str(workers),
            *(["--s3-spool", str(self.spool)] if "--s3-endpoint" in self.args else []),
            "--index-node",
            self.name,
            *self.args,
        ]
        self.service = Service(self.name, cmd, self.log, env).start()
        service = self.service

        def ready() -> bool:
            service.check()
            text = self.log.read_text(errors="replace")
            return "listening on" in text and text.count(" ready (pid") >= workers

        wait_for(ready, timeout, f"{self.name} to start")
        return self

    def pids(self) -> list[int]:
        """The supervisor and its children (workers, aggregator)."""
        if self.service is None or self.service.proc is None:
            return []
        top = self.service.proc.pid
        from loadtest.proctree import children

        return [top, *children(top)]

    def kill(self) -> None:
        """SIGKILL the whole tree at once, as a power cut or the OOM killer would."""
        pids = self.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.service is not None and self.service.proc is not None:
            self.service.proc.wait(10)
        # Reparented children: wait until they are gone (or zombies nobody reaps).
        wait_for(lambda: all(_gone(pid) for pid in pids[1:]), 10, f"{self.name} to die")

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop(timeout=40)
        # Workers left behind by a failed stop are this node's only (by process group).
        for pid in self.pids()[1:]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


class Moto:
    """moto's standalone S3 server on 127.0.0.1, one bucket (state in memory)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.service = Service(
            "moto",
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            workdir / "moto.log",
        )

    def start(self) -> Moto:
        self.service.start()

        def answers() -> bool:
            self.service.check()
            return http_get(self.url + "/moto-api/", 2)[0] != 0

        wait_for(answers, 30, "the S3 server")
        self.client().create_bucket(Bucket=BUCKET)
        return self

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id="cluster",
            aws_secret_access_key="cluster",
        )

    def objects(self) -> dict[str, int]:
        """Key -> size of every object in the bucket."""
        out: dict[str, int] = {}
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
            for item in page.get("Contents", []):
                out[item["Key"]] = int(item["Size"])
        return out

    def body(self, key: str) -> bytes:
        return bytes(self.client().get_object(Bucket=BUCKET, Key=key)["Body"].read())


class HAProxy:
    """HAProxy from deploy/haproxy.cfg in the foreground (``-db``)."""

    def __init__(self, workdir: Path, nodes: Sequence[Node]) -> None:
        self.port = free_port()
        self.workdir = workdir
        servers = "".join(
            f"    server {n.name} 127.0.0.1:{n.port} check port {n.metrics_port}\n" for n in nodes
        )
        self.config = workdir / "haproxy.cfg"
        text = render(
            "haproxy.cfg",
            bind=f"127.0.0.1:{self.port}",
            runtime=str(workdir),
            servers=servers,
            source=f"    source {BALANCER_SOURCE}\n",
        )
        self.config.write_text(text)
        self.service = Service(
            "haproxy",
            [haproxy_binary() or "haproxy", "-db", "-f", str(self.config)],
            workdir / "haproxy.log",
        )

    def start(self) -> HAProxy:
        self.service.start()
        wait_for(lambda: self.service.check() and self.stats(), 30, "HAProxy")
        return self

    def command(self, line: str) -> str:
        """One command on the admin socket (``show stat``, ``set server ...``); its
        answer, or "" when the socket does not answer."""
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(str(self.workdir / "haproxy.sock"))
                s.sendall(line.encode() + b"\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
        except OSError:
            return ""
        return data.decode(errors="replace")

    def stats(self) -> dict[str, str]:
        """Server name -> status (UP, DOWN, MAINT, ...) from the admin socket."""
        out: dict[str, str] = {}
        lines = self.command("show stat").splitlines()
        if not lines:
            return out
        header = lines[0].lstrip("# ").split(",")
        for line in lines[1:]:
            row = dict(zip(header, line.split(","), strict=False))
            if row.get("pxname") == "receivers" and row.get("svname") not in ("BACKEND", None):
                out[row["svname"]] = row.get("status", "")
        return out


class Prometheus:
    """Prometheus from deploy/prometheus.yml, scraping every node."""

    def __init__(self, workdir: Path, nodes: Sequence[Node], interval: str = "1s") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        targets = json.dumps([f"127.0.0.1:{n.metrics_port}" for n in nodes])
        config.write_text(render("prometheus.yml", scrape_interval=interval, targets=targets))
        self.service = Service(
            "prometheus",
            [
                shutil.which("prometheus") or "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'prometheus-data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            workdir / "prometheus.log",
        )

    def start(self) -> Prometheus:
        self.service.start()
        wait_for(
            lambda: self.service.check() and http_get(self.url + "/-/ready")[0] == 200,
            60,
            "Prometheus",
        )
        return self

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The result vector of an instant query (empty when nothing matched)."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        status, body = http_get(url)
        if status != 200:
            return []
        return list(json.loads(body)["data"]["result"])

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def targets_up(self) -> int:
        return int(self.value("sum(up{job='pacs-receiver'})") or 0)
