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

import json
import logging
import os
import shutil
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from unmix_ray.concurrency import file_lock, run_parallel
from unmix_ray.data.errors import DatasetError
from unmix_ray.storage import (
    DEFAULT_PART_SIZE,
    ObjectChanged,
    ObjectMismatch,
    RemoteObject,
    etag_matches,
    fetch_object,
    parse_s3_url,
    redact_endpoint,
    s3_client,
)

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
STATE_DIR = ".unmix_stage"
MANIFEST_VERSION = 1
LAYOUT = """s3://bucket/prefix/...               a tree of objects, copied to <root>/... (same relative paths)
s3://bucket/key.tar[.gz]|.tgz|.zip   one archive, extracted into <root>
(credentials: environment or instance role; endpoint: endpoint_url or $AWS_ENDPOINT_URL_S3)"""


def is_archive(key: str) -> bool:
    return key.lower().endswith(ARCHIVE_SUFFIXES)


def _fetch_verified(client, bucket: str, obj: RemoteObject, path: Path, part_size: int, threads: int,
                    dataset: str) -> None:
    try:
        try:
            fetch_object(client, bucket, obj, path, part_size, threads)
        except ObjectMismatch as e:
            log.warning("%s; fetching it again", e)
            try:
                fetch_object(client, bucket, obj, path, part_size, threads)
            except ObjectMismatch as e2:
                raise DatasetError(dataset, f"s3://{bucket}/{obj.key}", f"checksum mismatch twice ({e2})",
                                   LAYOUT) from e2
    except ObjectChanged as e:
        raise DatasetError(dataset, f"s3://{bucket}/{obj.key}", "the object changed while it was being staged; "
                           "run again", LAYOUT) from e


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
        client = client or s3_client(endpoint_url, max_connections=max(10, 2 * threads))
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
                 len(objects), sum(o.size for o in objects) / 1e6, redact_endpoint(endpoint_url), dest)
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

        run_parallel(one, to_fetch, threads)
    journal.unlink(missing_ok=True)
    return dict(sorted(files.items()))


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
