"""ObjectWriter against a real S3 API server (moto's standalone server): parts go up
while the data set streams, the writer asks for reading to pause while more than one
part is in flight and calls back once one is done, a discard aborts the multipart
upload; S3Settings and the configuration refuse what cannot work."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from receiver.config import ConfigError, build
from tests.receiver.test_s3 import BUCKET, MotoServer
from workers.storage.config import StorageConfig
from workers.storage.objectstore import ObjectStore, S3Settings, make_client

pytest.importorskip("moto.server")

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
PART = 5 * 1024 * 1024


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = MotoServer(tmp_path_factory.mktemp("moto")).start()
    server.make_bucket()
    yield server
    server.stop()


@pytest.fixture
def store(
    tmp_path: Path, moto: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ObjectStore]:
    for name, value in (
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        monkeypatch.setenv(name, value)
    settings = S3Settings.from_url(f"s3://{BUCKET}/unit/", endpoint=moto.url, part_size=PART)
    s = ObjectStore(StorageConfig(root=tmp_path, digest=True), settings, make_client(settings))
    yield s
    s.close()


def test_parts_stream_with_flow_control_and_the_object_is_the_stream(
    store: ObjectStore, moto: MotoServer
) -> None:
    uid = "1.2.3.4.5.6789"
    chunk = os.urandom(256 * 1024)
    fragments = 4 * PART // len(chunk) + 3  # four full parts and a short last one

    async def run() -> tuple[bool, int, bytes]:
        writer = store.begin(CT, uid, EXPLICIT_LE, "UNITSCU")
        drained = asyncio.Event()
        writer.on_drain = drained.set
        saw_lagging = False
        resumed = 0
        for _ in range(fragments):
            writer.write(chunk)
            if writer.lagging:
                # What the association does: stop reading until a part is done.
                saw_lagging = True
                drained.clear()
                await asyncio.wait_for(drained.wait(), 30)
                resumed += 1
                assert not writer.lagging
        result = await asyncio.get_running_loop().run_in_executor(None, writer.commit)
        assert result.ok, result.comment
        assert result.path == f"s3://{BUCKET}/unit/unknown/unknown/{uid}.dcm"
        assert result.digest == hashlib.sha256(chunk * fragments).hexdigest()
        return saw_lagging, resumed, chunk * fragments

    saw_lagging, resumed, data = asyncio.run(run())
    assert saw_lagging and resumed >= 1
    client = moto.client()
    head = client.head_object(Bucket=BUCKET, Key=f"unit/unknown/unknown/{uid}.dcm")
    assert head["ETag"].strip('"').endswith("-5")
    body = client.get_object(Bucket=BUCKET, Key=f"unit/unknown/unknown/{uid}.dcm")["Body"].read()
    assert body[128:132] == b"DICM" and body.endswith(data)


def test_discard_aborts_the_multipart_upload(store: ObjectStore, moto: MotoServer) -> None:
    writer = store.begin(CT, "1.2.3.4.5.999", EXPLICIT_LE)
    writer.write(os.urandom(PART + 1))  # one part shipped: the upload exists
    writer.discard()
    store.close()  # waits for the abort
    assert moto.client().list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []
    keys = moto.client().list_objects_v2(Bucket=BUCKET, Prefix="unit/").get("Contents", [])
    assert not any(k["Key"].endswith("1.2.3.4.5.999.dcm") for k in keys)


@pytest.mark.parametrize(
    "url",
    ["s3://", "s3://A_B/x", "s3://bucket/a//b", "s3://bucket/../x", "file:///tmp"],
)
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        S3Settings.from_url(url)


def test_prefix_is_normalised() -> None:
    assert S3Settings.from_url("s3://bucket").prefix == ""
    assert S3Settings.from_url("s3://bucket/a/b/").prefix == "a/b/"


@pytest.mark.parametrize(
    ("flags", "word"),
    [
        ({"storage": "s3://bucket/p", "s3_durability": "later"}, "durability"),
        ({"storage": "s3://bucket/p", "s3_part_size": 1024}, "part size"),
        ({"storage": "s3://Bad_Bucket/p"}, "bucket"),
        ({"storage": "s3://bucket/p", "s3_spool_limit": -1}, "spool limit"),
    ],
)
def test_bad_s3_settings_are_one_config_error(flags: dict[str, object], word: str) -> None:
    with pytest.raises(ConfigError) as err:
        build({}, flags)
    assert word in str(err.value) and "\n" not in str(err.value)
