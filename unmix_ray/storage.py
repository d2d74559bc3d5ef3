"""S3 access, owned here: URLs, endpoints, clients, filesystems and verified object downloads.

- ``resolve_endpoint``: an explicit endpoint, else ``$AWS_ENDPOINT_URL_S3`` / ``$AWS_ENDPOINT_URL``
  (S3-compatible stores such as MinIO or a moto server); None means AWS itself.
- ``s3_client`` (boto3, for staging datasets) and ``arrow_filesystem`` (pyarrow, what Ray's storage
  and checkpoint reads use): credentials always come from boto3's / Arrow's default chain
  (environment, shared config, instance role); nothing here reads or logs them.
- ``fetch_object``: one object in ranged parts, resumable, checked against its size and ETag.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from unmix_ray.concurrency import run_parallel

log = logging.getLogger(__name__)

DEFAULT_PART_SIZE = 64 * 2**20
PART_ATTEMPTS = 4  # tries per part on network errors
# Part sizes tried when checking a multipart ETag (boto3's default first, then common tool defaults).
MULTIPART_GUESSES = tuple(m * 2**20 for m in (8, 5, 16, 15, 32, 64, 100, 128, 256, 512, 1024))

@dataclass(frozen=True)
class RemoteObject:
    key: str
    rel: str  # path under the destination (the archive's own file name for an archive)
    size: int
    etag: str


class ObjectMismatch(Exception):
    """The bytes fetched do not match the object's size or ETag."""


class ObjectChanged(Exception):
    """The object was replaced while its parts were being fetched (its ETag no longer matches)."""


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ("bucket", "some/prefix")."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"not an s3:// URL: {url!r}")
    return parts.netloc, parts.path.lstrip("/")


def redact_endpoint(url: str | None) -> str:
    """A URL fit for logs: any user:password@ part is dropped."""
    if not url:
        return "(default endpoint)"
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))




def resolve_endpoint(explicit: str | None = None) -> str | None:
    """The S3-compatible endpoint to use: ``explicit``, else the AWS SDKs' environment variables."""
    return explicit or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def arrow_filesystem(uri: str, endpoint_url: str | None = None) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) for a local path or an ``s3://`` URI. An S3-compatible
    ``endpoint_url`` gets an explicit S3FileSystem; otherwise Arrow resolves the URI itself."""
    import pyarrow.fs

    if not uri.startswith("s3://"):
        return pyarrow.fs.LocalFileSystem(), uri
    if endpoint_url:
        fs = pyarrow.fs.S3FileSystem(endpoint_override=endpoint_url, scheme=urlsplit(endpoint_url).scheme or "https",
                                     region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
        return fs, uri.removeprefix("s3://")
    return pyarrow.fs.FileSystem.from_uri(uri)


def read_bytes(uri: str, endpoint_url: str | None = None) -> bytes:
    """The whole content of a local file or an ``s3://`` object."""
    if "://" not in uri:
        return Path(uri).read_bytes()
    fs, path = arrow_filesystem(uri, resolve_endpoint(endpoint_url))
    with fs.open_input_stream(path) as f:
        return f.read()

def s3_client(endpoint_url: str | None = None, max_connections: int = 16):
    """An S3 client with the default credential chain; retries with backoff on throttling."""
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": 10, "mode": "adaptive"}, max_pool_connections=max_connections)
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


# ---- ETags -----------------------------------------------------------------------------------------------

def _md5_of_range(path: Path, start: int, length: int) -> bytes:
    h = hashlib.md5()
    with open(path, "rb") as f:
        f.seek(start)
        left = length
        while left > 0:
            block = f.read(min(left, 8 * 2**20))
            if not block:
                break
            h.update(block)
            left -= len(block)
    return h.digest()


def etag_matches(path: Path, etag: str, size: int) -> bool | None:
    """Whether ``path`` hashes to the S3 ETag; None when the ETag cannot be checked (unknown scheme)."""
    etag = etag.strip('"')
    if re.fullmatch(r"[0-9a-f]{32}", etag):
        return _md5_of_range(path, 0, size).hex() == etag
    m = re.fullmatch(r"([0-9a-f]{32})-(\d+)", etag)
    if not m:
        return None  # e.g. SSE-KMS objects: the ETag is not an MD5
    digest, parts = m.group(1), int(m.group(2))
    fits = [p for p in MULTIPART_GUESSES if (parts - 1) * p < size <= parts * p]
    ceil_mib = -(-size // parts // 2**20) * 2**20
    if (parts - 1) * ceil_mib < size <= parts * ceil_mib and ceil_mib not in fits:
        fits.append(ceil_mib)
    if not fits:
        return None
    for part in fits:
        h = hashlib.md5()
        for i in range(parts):
            h.update(_md5_of_range(path, i * part, min(part, size - i * part)))
        if h.hexdigest() == digest:
            return True
    return False


# ---- one object ------------------------------------------------------------------------------------------

def _read_done(path: Path, header: str) -> set[int]:
    """Part numbers recorded in a ``.part.done`` file written with the same ``header`` (part size, ETag)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return set()
    if not lines or lines[0] != header:
        return set()
    return {int(x) for x in lines[1:] if x.strip().isdigit()}


class _ShortRead(OSError):
    pass


def _transient() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import BotoCoreError
    from urllib3.exceptions import HTTPError

    return BotoCoreError, HTTPError, ConnectionError, TimeoutError, _ShortRead


def fetch_object(client, bucket: str, obj: RemoteObject, path: Path, part_size: int = DEFAULT_PART_SIZE,
                 threads: int = 1) -> None:
    """Download ``obj`` to ``path`` through ``path.part`` (resuming from ``path.part.done``), verified.

    A part cut by a network error is fetched again (``PART_ATTEMPTS`` tries, with backoff); a process
    that dies leaves the ``.part`` and ``.part.done`` files for the next call to resume from.
    """
    from botocore.exceptions import ClientError

    path.parent.mkdir(parents=True, exist_ok=True)
    part_path = path.with_name(path.name + ".part")
    done_path = path.with_name(path.name + ".part.done")
    nparts = max(1, -(-obj.size // part_size))
    header = f"part_size={part_size} etag={obj.etag}"
    done = set()
    if part_path.exists() and part_path.stat().st_size == obj.size:
        done = _read_done(done_path, header)
    if not done:
        with open(part_path, "wb") as f:
            f.truncate(obj.size)
        done_path.write_text(header + "\n")
    else:
        log.info("resuming s3://%s/%s: %d of %d parts already here", bucket, obj.key, len(done), nparts)
    pending = [i for i in range(nparts) if i not in done]
    record = threading.Lock()
    transient = _transient()

    def get_range(lo: int, hi: int) -> None:
        try:
            resp = client.get_object(Bucket=bucket, Key=obj.key, Range=f"bytes={lo}-{hi}", IfMatch=obj.etag)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "412"):
                raise ObjectChanged(f"s3://{bucket}/{obj.key} changed while it was being fetched; run again") from e
            raise
        fd = os.open(part_path, os.O_WRONLY)
        try:
            offset = lo
            for block in resp["Body"].iter_chunks(2**20):
                os.pwrite(fd, block, offset)
                offset += len(block)
        finally:
            os.close(fd)
        if offset != hi + 1:
            raise _ShortRead(f"short read of bytes {lo}-{hi}: got {offset - lo} bytes")

    def get_part(i: int) -> None:
        if obj.size == 0:
            return
        lo = i * part_size
        hi = min(obj.size, lo + part_size) - 1
        for attempt in range(1, PART_ATTEMPTS + 1):
            try:
                get_range(lo, hi)
                break
            except transient as e:
                if attempt == PART_ATTEMPTS:
                    raise
                log.warning("s3://%s/%s bytes %d-%d: %s; fetching the part again (%d/%d)", bucket, obj.key,
                            lo, hi, type(e).__name__, attempt, PART_ATTEMPTS - 1)
                time.sleep(min(30.0, 0.5 * 2**attempt))
        with record, open(done_path, "a") as f:
            f.write(f"{i}\n")

    run_parallel(get_part, pending, min(threads, len(pending)))
    if part_path.stat().st_size != obj.size or etag_matches(part_path, obj.etag, obj.size) is False:
        part_path.unlink(missing_ok=True)
        done_path.unlink(missing_ok=True)
        raise ObjectMismatch(f"s3://{bucket}/{obj.key}: the bytes fetched do not match size {obj.size} / "
                        f"ETag {obj.etag}")
    os.replace(part_path, path)
    done_path.unlink(missing_ok=True)


