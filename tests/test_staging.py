"""S3 staging against a real S3 API: ``moto_server`` on loopback, started and stopped here.

Object GETs are counted from the server's own access log, so "downloaded once" means what the
server saw, across processes.
"""

from __future__ import annotations

import io
import logging
import multiprocessing as mp
import os
import re
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import boto3
import pytest

from unmix_ray import storage
from unmix_ray.config import DatasetConfig
from unmix_ray.data import (
    DatasetError,
    load_split,
    staging,
)

from .conftest import missing
from .fixtures import write_fixture

SECRET = "staging-test-secret-value-0123456789"
BUCKET = "unmix-data"
GET_LINE = re.compile(r'"(?:\x1b\[[0-9;]*m)*GET (/[^ ?"]+) HTTP/1\.1(?:\x1b\[[0-9;]*m)*" (\d{3})')


class S3Server:
    def __init__(self, url: str, log_path: Path):
        self.url, self.log_path = url, log_path

    def gets(self) -> list[tuple[str, int]]:
        """(key, status) of every object GET the server has logged so far."""
        text = self.log_path.read_text(errors="replace")
        prefix = f"/{BUCKET}/"
        return [(m.group(1)[len(prefix):], int(m.group(2))) for m in GET_LINE.finditer(text)
                if m.group(1).startswith(prefix)]

    def client(self):
        return boto3.client("s3", endpoint_url=self.url)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    exe = Path(sys.executable).with_name("moto_server")
    if not exe.exists():
        missing("moto_server is not installed next to this Python (pip install 'moto[server]')")
    port = _free_port()
    log_path = tmp_path_factory.mktemp("moto") / "access.log"
    env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY=SECRET,
               AWS_DEFAULT_REGION="us-east-1")
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=log_file,
                                stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"moto_server did not come up on {url}:\n{log_path.read_text()[-2000:]}")
            time.sleep(0.2)
    mp_env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": SECRET,
              "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in mp_env}
    os.environ.update(mp_env)
    server = S3Server(url, log_path)
    server.client().create_bucket(Bucket=BUCKET)
    try:
        yield server
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _upload_tree(s3: S3Server, local: Path, prefix: str) -> dict[str, bytes]:
    client, out = s3.client(), {}
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        rel = path.relative_to(local).as_posix()
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{rel}", Body=path.read_bytes())
        out[rel] = path.read_bytes()
    return out


def _targz(folder: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        t.add(folder, arcname=folder.name)
    return buf.getvalue()


def _new_gets(s3: S3Server, before: int) -> list[tuple[str, int]]:
    time.sleep(0.3)  # the access log line is written just after the response
    return s3.gets()[before:]


def test_tree_is_staged_verified_and_reused(s3, tmp_path):
    src = write_fixture("cifar10", tmp_path / "src", 1)
    files = _upload_tree(s3, src, "tree1")
    before = len(s3.gets())
    dest = staging.stage(f"s3://{BUCKET}/tree1", tmp_path / "dest", endpoint_url=s3.url, dataset="cifar10")
    for rel, data in files.items():
        assert (dest / rel).read_bytes() == data
    gets = _new_gets(s3, before)
    assert sorted(k for k, _ in gets) == sorted(f"tree1/{r}" for r in files)  # each object once
    before = len(s3.gets())
    staging.stage(f"s3://{BUCKET}/tree1", dest, endpoint_url=s3.url, dataset="cifar10")
    assert _new_gets(s3, before) == []  # complete copy reused: nothing fetched


def _stage_in_child(source: str, dest: str, endpoint: str, barrier) -> str:
    barrier.wait(30)
    return str(staging.stage(source, dest, endpoint_url=endpoint, dataset="stl10"))


def test_two_processes_stage_once(s3, tmp_path):
    src = write_fixture("stl10", tmp_path / "src", 3)
    files = _upload_tree(s3, src, "tree2")
    before = len(s3.gets())
    ctx = mp.get_context("spawn")
    barrier = ctx.Manager().Barrier(2)
    with ctx.Pool(2) as pool:
        results = [pool.apply_async(_stage_in_child, (f"s3://{BUCKET}/tree2", str(tmp_path / "dest"), s3.url,
                                                      barrier)) for _ in range(2)]
        paths = [r.get(120) for r in results]
    assert paths[0] == paths[1]
    gets = _new_gets(s3, before)
    keys = [k for k, _ in gets]
    assert sorted(keys) == sorted(f"tree2/{r}" for r in files), "every object fetched exactly once in all"
    for rel, data in files.items():
        assert (tmp_path / "dest" / rel).read_bytes() == data


class _CutBody:
    """A response body that delivers ``limit`` bytes, then fails as ``error``."""

    def __init__(self, body, limit: int, error: BaseException):
        self.body, self.limit, self.error = body, limit, error

    def iter_chunks(self, size: int):
        sent = 0
        for block in self.body.iter_chunks(min(size, 4096)):
            if sent + len(block) > self.limit:
                yield block[: self.limit - sent]
                raise self.error
            sent += len(block)
            yield block


class _CuttingClient:
    """A real boto3 client whose ``cut_at``-th object GET is cut half way through."""

    def __init__(self, client, cut_at: int, error: BaseException):
        self.client, self.cut_at, self.error, self.calls = client, cut_at, error, 0

    def __getattr__(self, name):
        return getattr(self.client, name)

    def get_object(self, **kw):
        self.calls += 1
        resp = self.client.get_object(**kw)
        if self.calls == self.cut_at:
            resp["Body"] = _CutBody(resp["Body"], resp["ContentLength"] // 2, self.error)
        return resp


@pytest.fixture()
def archive(s3, tmp_path):
    src = write_fixture("stl10", tmp_path / "src", 2)
    data = _targz(src / "stl10_binary")
    s3.client().put_object(Bucket=BUCKET, Key=f"arch/{tmp_path.name}/stl10_binary.tar.gz", Body=data)
    return f"s3://{BUCKET}/arch/{tmp_path.name}/stl10_binary.tar.gz", len(data), src


def test_interrupted_download_resumes_in_the_next_process(s3, tmp_path, archive):
    source, size, src = archive
    part = 16 * 1024
    nparts = -(-size // part)
    assert nparts >= 6
    dest = tmp_path / "dest"
    before = len(s3.gets())
    # The process "dies" (KeyboardInterrupt is not a network error) in the middle of part 3.
    client = _CuttingClient(s3.client(), cut_at=3, error=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        staging.stage(source, dest, client=client, part_size=part, threads=1, dataset="stl10")
    partial = dest / ".unmix_stage" / "download" / "stl10_binary.tar.gz.part"
    assert partial.exists()
    assert partial.with_name(partial.name + ".done").read_text().splitlines()[1:] == ["0", "1"]
    first = len(_new_gets(s3, before))
    assert first == 3
    # A new call fetches only the parts still missing (3 of nparts, ranged: 206), then extracts.
    staging.stage(source, dest, endpoint_url=s3.url, part_size=part, threads=2, dataset="stl10")
    gets = _new_gets(s3, before)[first:]
    assert len(gets) == nparts - 2 and {status for _, status in gets} == {206}
    cfg = DatasetConfig(name="stl10", root=str(dest), num_classes=10, channels=3, image_size=96, crop_size=64,
                        mean=(0.5,) * 3, std=(0.25,) * 3)
    assert len(load_split(cfg, "train")) == 20
    staged, original = dest / "stl10_binary" / "train_X.bin", src / "stl10_binary" / "train_X.bin"
    assert staged.read_bytes() == original.read_bytes()


def test_a_part_cut_by_the_network_is_fetched_again(s3, tmp_path, archive, caplog):
    source, size, _ = archive
    part = 16 * 1024
    nparts = -(-size // part)
    before = len(s3.gets())
    client = _CuttingClient(s3.client(), cut_at=2, error=ConnectionResetError("connection reset by peer"))
    with caplog.at_level(logging.WARNING, logger="unmix_ray.data.staging"):
        staging.stage(source, tmp_path / "dest", client=client, part_size=part, threads=1, dataset="stl10")
    assert len(_new_gets(s3, before)) == nparts + 1  # the cut part once more
    assert "fetching the part again" in caplog.text
    assert (tmp_path / "dest" / "stl10_binary" / "test_X.bin").is_file()


def test_corrupted_local_copy_is_detected_and_fetched_again(s3, tmp_path):
    src = write_fixture("cifar100", tmp_path / "src", 1)
    files = _upload_tree(s3, src, "tree3")
    source = f"s3://{BUCKET}/tree3"
    dest = staging.stage(source, tmp_path / "dest", endpoint_url=s3.url, dataset="cifar100")
    altered, truncated, touched = "cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta"
    blob = bytearray((dest / altered).read_bytes())
    blob[100] ^= 0xFF  # same size, different bytes
    (dest / altered).write_bytes(bytes(blob))
    with open(dest / truncated, "r+b") as f:
        f.truncate(10)
    os.utime(dest / touched)  # mtime changes, content does not: re-hashed, kept
    before = len(s3.gets())
    staging.stage(source, dest, endpoint_url=s3.url, dataset="cifar100")
    assert sorted(k for k, _ in _new_gets(s3, before)) == sorted([f"tree3/{altered}", f"tree3/{truncated}"])
    for rel, data in files.items():
        assert (dest / rel).read_bytes() == data
    # Same size and the old mtime put back: only a full verification can tell.
    st = (dest / altered).stat()
    blob = bytearray((dest / altered).read_bytes())
    blob[200] ^= 0xFF
    (dest / altered).write_bytes(bytes(blob))
    os.utime(dest / altered, ns=(st.st_atime_ns, st.st_mtime_ns))
    before = len(s3.gets())
    staging.stage(source, dest, endpoint_url=s3.url, dataset="cifar100")
    assert _new_gets(s3, before) == []
    staging.stage(source, dest, endpoint_url=s3.url, dataset="cifar100", verify="full")
    assert [k for k, _ in _new_gets(s3, before)] == [f"tree3/{altered}"]
    assert (dest / altered).read_bytes() == files[altered]


def test_altered_file_of_an_archive_refetches_the_archive(s3, tmp_path, archive):
    source, _, src = archive
    dest = staging.stage(source, tmp_path / "dest", endpoint_url=s3.url, dataset="stl10")
    target = dest / "stl10_binary" / "test_y.bin"
    target.write_bytes(b"\x01" * target.stat().st_size)
    before = len(s3.gets())
    staging.stage(source, dest, endpoint_url=s3.url, dataset="stl10")
    assert len(_new_gets(s3, before)) == 1  # the archive (one part at the default part size)
    assert target.read_bytes() == (src / "stl10_binary" / "test_y.bin").read_bytes()


def test_load_split_stages_from_the_configured_source(s3, tmp_path):
    src = write_fixture("tiny_imagenet", tmp_path / "src", 2, num_classes=3)
    _upload_tree(s3, src, "tiny")
    cfg = DatasetConfig(name="tiny_imagenet", root=str(tmp_path / "node"), num_classes=3, channels=3,
                        image_size=64, crop_size=64, mean=(0.5,) * 3, std=(0.25,) * 3,
                        source=f"s3://{BUCKET}/tiny", endpoint_url=s3.url)
    val = load_split(cfg, "val")
    assert val.images.shape == (6, 3, 64, 64) and sorted(val.labels.tolist()) == [0, 0, 1, 1, 2, 2]


def test_bad_sources_fail_clearly(s3, tmp_path):
    with pytest.raises(DatasetError, match="no objects under this prefix") as e:
        staging.stage(f"s3://{BUCKET}/nothing-here", tmp_path / "a", endpoint_url=s3.url, dataset="cifar10")
    assert "cifar10" in str(e.value) and f"s3://{BUCKET}/nothing-here" in str(e.value)
    assert "expected layout" in str(e.value)
    with pytest.raises(DatasetError, match="NoSuchBucket"):
        staging.stage("s3://no-such-bucket/x", tmp_path / "b", endpoint_url=s3.url, dataset="cifar10")
    with pytest.raises(DatasetError, match="NoSuchKey|404|Not Found"):
        staging.stage(f"s3://{BUCKET}/missing.tar.gz", tmp_path / "c", endpoint_url=s3.url, dataset="stl10")
    from botocore.config import Config

    closed = f"http://127.0.0.1:{_free_port()}"
    client = boto3.client("s3", endpoint_url=closed, config=Config(retries={"max_attempts": 1},
                                                                   connect_timeout=2))
    with pytest.raises(DatasetError, match="cannot reach the source"):
        staging.stage(f"s3://{BUCKET}/tree1", tmp_path / "d", client=client, dataset="cifar10")


def test_unreachable_source_falls_back_to_a_complete_copy(s3, tmp_path):
    src = write_fixture("cifar10", tmp_path / "src", 1)
    _upload_tree(s3, src, "tree4")
    dest = staging.stage(f"s3://{BUCKET}/tree4", tmp_path / "dest", endpoint_url=s3.url)
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{_free_port()}",
                          config=Config(retries={"max_attempts": 1}, connect_timeout=2))
    assert staging.stage(f"s3://{BUCKET}/tree4", dest, client=client) == dest


def test_credentials_never_reach_the_logs(s3, tmp_path, caplog):
    src = write_fixture("cifar10", tmp_path / "src", 1)
    _upload_tree(s3, src, "tree5")
    with caplog.at_level(logging.DEBUG):
        staging.stage(f"s3://{BUCKET}/tree5", tmp_path / "dest", endpoint_url=s3.url)
    assert "staging s3://" in caplog.text
    assert SECRET not in caplog.text
    assert storage.redact_endpoint("https://user:pa55@minio.local:9000/x") == "https://minio.local:9000/x"


def test_multipart_etags_are_checked(tmp_path):
    import hashlib

    part = 5 * 2**20
    data = os.urandom(part + 1000)
    path = tmp_path / "f"
    path.write_bytes(data)
    parts = hashlib.md5(data[:part]).digest() + hashlib.md5(data[part:]).digest()
    etag = hashlib.md5(parts).hexdigest() + "-2"
    assert storage.etag_matches(path, etag, len(data)) is True
    assert storage.etag_matches(path, etag.replace("-2", "-3"), len(data)) is False
    assert storage.etag_matches(path, hashlib.md5(data).hexdigest(), len(data)) is True
    assert storage.etag_matches(path, hashlib.md5(b"other").hexdigest(), len(data)) is False
    assert storage.etag_matches(path, "not-an-md5", len(data)) is None  # e.g. SSE-KMS: size check only


def test_files_next_to_an_extracted_archive_are_not_tracked(s3, tmp_path, archive):
    source, _, _ = archive
    dest = tmp_path / "dest"
    (dest / "notes").mkdir(parents=True)
    (dest / "notes" / "mine.txt").write_text("kept, and not part of the dataset")
    staging.stage(source, dest, endpoint_url=s3.url, dataset="stl10")
    (dest / "notes" / "mine.txt").unlink()  # e.g. a cache cleared: no reason to fetch the archive again
    before = len(s3.gets())
    staging.stage(source, dest, endpoint_url=s3.url, dataset="stl10")
    assert _new_gets(s3, before) == []
