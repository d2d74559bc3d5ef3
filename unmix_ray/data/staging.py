"""Stage a dataset from S3 to local disk, once per node, resumably and verified.

A dataset may live at ``s3://bucket/prefix`` as a tree of objects (copied under the same relative
paths) or as one archive (``.tar``, ``.tar.gz``, ``.tgz``, ``.zip``: downloaded and extracted).
``stage(source, dest)`` makes ``dest`` a complete local copy and returns it:

- One process per node does the work; the others block on an ``fcntl`` lock in
  ``dest/.unmix_stage/lock`` and then find the finished copy. A process that dies releases the lock.
- Every object is fetched in parts of ``part_size`` bytes by ranged GETs (``If-Match`` its ETag, so
  an object replaced mid-download is noticed), written into ``<file>.part`` at their offsets, and each
  finished part is recorded in ``<file>.part.done``: an interrupted download resumes with the
  parts still missing. Objects and parts download on ``threads`` threads.
- A finished file is checked against the object's size and ETag (its MD5, or the MD5 of part MD5s for
  a multipart upload) before it is renamed into place; a mismatch is fetched again once, then fails.
- A manifest (``dest/.unmix_stage/manifest.json``) records every object's size and ETag and every
  local file's size and mtime. The next call reuses the copy when the remote listing is unchanged and
  every local file still has its size and mtime; a file whose mtime changed is re-hashed against its
  ETag (``verify="full"`` re-hashes all). Missing, resized or altered files are fetched again (for an
  archive: the archive, re-extracted).

boto3 does the transfers, with its default credential chain (environment, shared config, instance
role); nothing here reads or logs credentials. ``endpoint_url`` (or ``$AWS_ENDPOINT_URL_S3``, which
boto3 reads itself) points it at an S3-compatible store.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tarfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit, urlunsplit

from unmix_ray.data.errors import DatasetError

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
STATE_DIR = ".unmix_stage"
MANIFEST_VERSION = 1
DEFAULT_PART_SIZE = 64 * 2**20
PART_ATTEMPTS = 4  # tries per part on network errors
# Part sizes tried when checking a multipart ETag (boto3's default first, then common tool defaults).
MULTIPART_GUESSES = tuple(m * 2**20 for m in (8, 5, 16, 15, 32, 64, 100, 128, 256, 512, 1024))

LAYOUT = """s3://bucket/prefix/...               a tree of objects, copied to <root>/... (same relative paths)
s3://bucket/key.tar[.gz]|.tgz|.zip   one archive, extracted into <root>
(credentials: environment or instance role; endpoint: endpoint_url or $AWS_ENDPOINT_URL_S3)"""


@dataclass(frozen=True)
class RemoteObject:
    key: str
    rel: str  # path under the destination (the archive's own file name for an archive)
    size: int
    etag: str


class _Mismatch(Exception):
    pass


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ("bucket", "some/prefix")."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"not an s3:// URL: {url!r}")
    return parts.netloc, parts.path.lstrip("/")


def redact(url: str | None) -> str:
    """A URL fit for logs: any user:password@ part is dropped."""
    if not url:
        return "(default endpoint)"
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def is_archive(key: str) -> bool:
    return key.lower().endswith(ARCHIVE_SUFFIXES)


def make_client(endpoint_url: str | None = None, max_connections: int = 16):
    """An S3 client with the default credential chain; retries with backoff on throttling."""
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": 10, "mode": "adaptive"}, max_pool_connections=max_connections)
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


# ---- locking ---------------------------------------------------------------------------------------------

@contextmanager
def file_lock(path: Path, timeout_s: float | None = None, what: str = "") -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if needed); wait for it, logging once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        start = time.monotonic()
        logged = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not logged:
                    log.info("waiting for another process on this node (%s; lock %s)", what or "busy", path)
                    logged = True
                if timeout_s is not None and time.monotonic() - start > timeout_s:
                    raise TimeoutError(f"waited {timeout_s:.0f} s for the lock {path}") from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # closing releases the lock


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
                 threads: int = 1, dataset: str = "dataset") -> None:
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
                raise DatasetError(dataset, f"s3://{bucket}/{obj.key}",
                                   "the object changed while it was being staged; run again", LAYOUT) from e
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

    if threads > 1 and len(pending) > 1:
        with ThreadPoolExecutor(min(threads, len(pending))) as pool:
            list(pool.map(get_part, pending))
    else:
        for i in pending:
            get_part(i)
    if part_path.stat().st_size != obj.size or etag_matches(part_path, obj.etag, obj.size) is False:
        part_path.unlink(missing_ok=True)
        done_path.unlink(missing_ok=True)
        raise _Mismatch(f"s3://{bucket}/{obj.key}: the bytes fetched do not match size {obj.size} / "
                        f"ETag {obj.etag}")
    os.replace(part_path, path)
    done_path.unlink(missing_ok=True)


def _fetch_verified(client, bucket: str, obj: RemoteObject, path: Path, part_size: int, threads: int,
                    dataset: str) -> None:
    try:
        fetch_object(client, bucket, obj, path, part_size, threads, dataset)
    except _Mismatch as e:
        log.warning("%s; fetching it again", e)
        try:
            fetch_object(client, bucket, obj, path, part_size, threads, dataset)
        except _Mismatch as e2:
            raise DatasetError(dataset, f"s3://{bucket}/{obj.key}", f"checksum mismatch twice ({e2})",
                               LAYOUT) from e2


# ---- listing, manifest -----------------------------------------------------------------------------------

def list_remote(client, bucket: str, key: str, dataset: str) -> tuple[str, list[RemoteObject]]:
    """("archive", [the archive]) or ("tree", [every object under the prefix])."""
    from botocore.exceptions import BotoCoreError, ClientError

    url = f"s3://{bucket}/{key}"
    try:
        if is_archive(key):
            head = client.head_object(Bucket=bucket, Key=key)
            name = PurePosixPath(key).name
            return "archive", [RemoteObject(key, name, head["ContentLength"], head["ETag"].strip('"'))]
        prefix = key.rstrip("/") + "/" if key else ""
        objects = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for o in page.get("Contents", []):
                if o["Key"].endswith("/"):
                    continue  # a "folder" marker
                rel = o["Key"][len(prefix):]
                if rel.startswith("/") or ".." in PurePosixPath(rel).parts or rel.startswith(STATE_DIR):
                    raise DatasetError(dataset, url, f"unsafe object name {o['Key']!r}", LAYOUT)
                objects.append(RemoteObject(o["Key"], rel, o["Size"], o["ETag"].strip('"')))
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "?")
        raise DatasetError(dataset, url, f"cannot list/read the source ({code})", LAYOUT) from e
    except BotoCoreError as e:
        raise DatasetError(dataset, url, f"cannot reach the source ({type(e).__name__})", LAYOUT) from e
    if not objects:
        raise DatasetError(dataset, url, "no objects under this prefix", LAYOUT)
    return "tree", objects


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _read_manifest(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if data.get("version") == MANIFEST_VERSION else None


def _walk_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != STATE_DIR]
        for name in filenames:
            yield Path(dirpath) / name


# ---- archives --------------------------------------------------------------------------------------------

def _extract(archive: Path, dest: Path, dataset: str) -> list[str]:
    """Extract into a scratch folder in ``dest``, then move each top-level entry into place."""
    scratch = dest / STATE_DIR / "extract"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as z:
                for name in z.namelist():
                    p = PurePosixPath(name)
                    if p.is_absolute() or ".." in p.parts:
                        raise DatasetError(dataset, archive, f"unsafe path {name!r} in the archive", LAYOUT)
                z.extractall(scratch)
        else:
            with tarfile.open(archive) as t:
                t.extractall(scratch, filter="data")
    except (tarfile.TarError, zipfile.BadZipFile, OSError) as e:
        raise DatasetError(dataset, archive, f"cannot extract the archive ({e})", LAYOUT) from e
    rels = sorted(str(p.relative_to(scratch)) for p in _walk_files(scratch))  # the archive's files only
    for entry in scratch.iterdir():
        target = dest / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.replace(entry, target)
    scratch.rmdir()
    return rels


# ---- the entry point -------------------------------------------------------------------------------------

def stage(source: str, dest: str | Path, *, endpoint_url: str | None = None, dataset: str = "dataset",
          client=None, part_size: int = DEFAULT_PART_SIZE, threads: int = 8, verify: str = "quick",
          lock_timeout_s: float | None = None, keep_archive: bool = False) -> Path:
    """Make ``dest`` a complete, verified local copy of ``source`` (see the module docstring)."""
    if verify not in ("quick", "full"):
        raise ValueError(f"verify must be 'quick' or 'full', got {verify!r}")
    try:
        bucket, key = parse_s3_url(source)
    except ValueError as e:
        raise DatasetError(dataset, source, str(e), LAYOUT) from e
    dest = Path(dest).expanduser()
    state = dest / STATE_DIR
    with file_lock(state / "lock", lock_timeout_s, f"staging {source}"):
        client = client or make_client(endpoint_url, max_connections=max(10, 2 * threads))
        manifest = _read_manifest(state / "manifest.json")
        if manifest and manifest.get("source") != source:
            manifest = None
        try:
            kind, objects = list_remote(client, bucket, key, dataset)
        except DatasetError:
            if manifest and not _check_files(dest, manifest, verify)[0]:
                log.warning("%s: cannot list %s; using the complete staged copy in %s", dataset, source, dest)
                return dest
            raise
        remote = {o.rel: [o.size, o.etag] for o in objects}
        stale: list[str] = []
        if manifest and manifest.get("remote") == remote:
            stale, manifest["files"] = _check_files(dest, manifest, verify)
            if not stale:
                log.info("%s: reusing the staged copy of %s in %s", dataset, source, dest)
                return dest
            log.warning("%s: %d staged file(s) missing or altered in %s (e.g. %s); fetching again",
                        dataset, len(stale), dest, stale[0])
        log.info("%s: staging %s (%s, %d object(s), %.1f MB) from %s into %s", dataset, source, kind,
                 len(objects), sum(o.size for o in objects) / 1e6, redact(endpoint_url), dest)
        if kind == "archive":
            files = _stage_archive(client, bucket, objects[0], dest, part_size, threads, dataset,
                                   keep_archive)
        else:
            known = {}
            if manifest and manifest["kind"] == "tree":
                for rel in set(manifest["files"]) - set(remote):  # deleted from the source since
                    (dest / rel).unlink(missing_ok=True)
                known = {rel: v for rel, v in manifest["files"].items() if rel not in set(stale)}
            files = _stage_tree(client, bucket, objects, dest, part_size, threads, dataset, known)
        _write_json(state / "manifest.json", {"version": MANIFEST_VERSION, "source": source, "kind": kind,
                                               "remote": remote, "files": files})
        log.info("%s: staged %s into %s", dataset, source, dest)
        return dest


def _check_files(dest: Path, manifest: dict, verify: str) -> tuple[list[str], dict[str, list]]:
    """(files missing, resized or altered; the manifest's files with re-verified mtimes refreshed).

    A tree's file whose mtime changed (every file, with ``verify="full"``) is re-hashed against its
    ETag; an archive's extracted files have no ETag, so a changed mtime marks them stale.
    """
    stale, files = [], {}
    for rel, entry in manifest["files"].items():
        size, mtime_ns = entry[0], entry[1]
        st = _stat(dest / rel)
        if st is None or st[0] != size:
            stale.append(rel)
        elif manifest["kind"] == "tree" and (st[1] != mtime_ns or verify == "full"):
            if etag_matches(dest / rel, entry[2], size) is False:
                stale.append(rel)
            else:
                files[rel] = [size, st[1], entry[2]]
        elif st[1] != mtime_ns:
            stale.append(rel)
        else:
            files[rel] = entry
    return stale, files


def _stage_tree(client, bucket: str, objects: list[RemoteObject], dest: Path, part_size: int, threads: int,
                dataset: str, known: dict[str, list]) -> dict[str, list]:
    """Fetch every object not already here; ``known`` are verified files of an earlier complete run."""
    state = dest / STATE_DIR
    journal = state / "journal.jsonl"  # files fetched by an earlier run that was interrupted
    have = dict(known)
    if journal.exists():
        for line in journal.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash
            have[entry["rel"]] = entry["v"]
    files: dict[str, list] = {}
    to_fetch = []
    for o in objects:
        prev = have.get(o.rel)
        st = _stat(dest / o.rel)
        if prev and st and prev[0] == o.size and prev[2] == o.etag and st == (prev[0], prev[1]):
            files[o.rel] = prev
        else:
            to_fetch.append(o)
    if len(to_fetch) < len(objects):
        log.info("%s: %d of %d objects already staged", dataset, len(objects) - len(to_fetch), len(objects))
    lock = threading.Lock()
    with open(journal, "a") as jf:
        def one(o: RemoteObject) -> None:
            path = dest / o.rel
            _fetch_verified(client, bucket, o, path, part_size, 1 if len(to_fetch) > 1 else threads, dataset)
            st = _stat(path)
            entry = [o.size, st[1], o.etag]
            with lock:
                files[o.rel] = entry
                jf.write(json.dumps({"rel": o.rel, "v": entry}) + "\n")
                jf.flush()

        _run_all(one, to_fetch, threads)
    journal.unlink(missing_ok=True)
    return dict(sorted(files.items()))


def _run_all(fn: Callable[[RemoteObject], None], items: list[RemoteObject], threads: int) -> None:
    if threads <= 1 or len(items) <= 1:
        for it in items:
            fn(it)
        return
    with ThreadPoolExecutor(threads) as pool:
        for f in [pool.submit(fn, it) for it in items]:
            f.result()


def _stage_archive(client, bucket: str, obj: RemoteObject, dest: Path, part_size: int, threads: int,
                   dataset: str, keep_archive: bool) -> dict[str, list]:
    state = dest / STATE_DIR
    archive = state / "download" / obj.rel
    marker = archive.with_name(archive.name + ".ok")  # size, mtime and ETag of a verified archive
    ok = json.loads(marker.read_text()) if marker.exists() else None
    if not (ok and ok[2] == obj.etag and _stat(archive) == (ok[0], ok[1])):
        _fetch_verified(client, bucket, obj, archive, part_size, threads, dataset)
        marker.write_text(json.dumps([*_stat(archive), obj.etag]))
    log.info("%s: extracting %s", dataset, archive.name)
    rels = _extract(archive, dest, dataset)
    if not keep_archive:
        archive.unlink()
        marker.unlink()
    return {rel: list(_stat(dest / rel)) for rel in rels}
