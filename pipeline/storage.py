"""Storage: every file the pipeline writes or reads, on a local disk or in S3, named by a string.

A location is a local path or `s3://bucket/key`; `join`, `name` and `parent` treat both alike.
Nothing appears at a final location until it is complete: a local file is written to a temporary
sibling and renamed; an S3 object is written by one PUT, which readers see whole or not at all.
S3 has no folder rename, so a folder (a stage's output) is complete only once its marker,
written last, exists.

Our own reads and writes go to S3 through boto3, with the standard AWS credential chain and
`S3_ENDPOINT` for another server than AWS. TensorFlow's own (TFRecords, model_dir, exports) go
through tf.io.gfile, whose `s3://` comes from tensorflow-io and the same variables (`tf_path`).
boto3 here because this module also runs in the Luigi process that schedules, and a process
that used tensorflow-io's S3 plugin aborts as it exits ("pure virtual method called", exit code
134, tensorflow/io#1912): only task processes, which end with os._exit, use it.
"""
from __future__ import annotations

import contextlib
import fnmatch
import glob as local_glob
import hashlib
import importlib
import io
import json
import logging
import os
import posixpath
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator

from pipeline.errors import MissingBucket

# Moves bytes between places and never changes them: how a result is stored cannot change the
# result (see pipeline.fingerprint). Which files form a dataset, and in what order, is decided
# elsewhere (pipeline.datafiles, runfiles.newest_export), never by a listing's order here.
AFFECTS_RESULTS = False

log = logging.getLogger(__name__)

S3_PREFIX = "s3://"
# Temporary siblings carry this infix, so that what a crash left is recognisable as such.
TEMP_INFIX = ".tmp-"
_UPLOADS_AT_ONCE = 16


def is_remote(location: str | os.PathLike) -> bool:
    return str(location).startswith(S3_PREFIX)


def join(base: str | os.PathLike, *parts: str) -> str:
    return posixpath.join(str(base), *parts)


def name(location: str | os.PathLike) -> str:
    return posixpath.basename(str(location).rstrip("/"))


def parent(location: str | os.PathLike) -> str:
    return posixpath.dirname(str(location).rstrip("/"))


def absolute(location: str | os.PathLike) -> str:
    """The location as every process names it: an S3 URI, or an absolute local path."""
    return str(location).rstrip("/") if is_remote(location) else str(Path(location).resolve())


def relative(location: str | os.PathLike, root: str | os.PathLike) -> str:
    """`location` relative to the folder `root`, with '/' between its parts."""
    location, root = absolute(location), absolute(root)
    if is_remote(location):
        if not location.startswith(root + "/"):
            raise ValueError(f"{location} is not inside {root}")
        return location[len(root) + 1:]
    return Path(location).relative_to(root).as_posix()


def is_inside(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies within it (both named alike: see `absolute`)."""
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def tf_path(location: str | os.PathLike) -> str:
    """`location` as TensorFlow's file functions take it; for S3, with tensorflow-io's plugin
    loaded. Only in processes that end with os._exit (see the module's docstring)."""
    if is_remote(location):
        importlib.import_module("tensorflow_io")  # registers s3:// with tf.io.gfile
    return str(location)


# S3, through boto3: clients per process, since a client made before a fork is not the child's.
_clients: dict[tuple[int, Any], Any] = {}
# boto3's default session, which makes them, is not thread-safe: Convert reads a shard's images
# from a pool of threads, whose first reads would otherwise race to make the client.
_clients_lock = threading.Lock()


def s3_client(kind: Any, **config: Any):
    """This process's client of `kind`, made with botocore `config` the first time."""
    pid = os.getpid()
    with _clients_lock:
        if (pid, kind) not in _clients:
            import boto3
            from botocore.config import Config

            for key in [key for key in _clients if key[0] != pid]:
                del _clients[key]
            _clients[pid, kind] = boto3.client(
                "s3", endpoint_url=os.environ.get("S3_ENDPOINT") or None,
                region_name=os.environ.get("AWS_REGION") or None,
                verify=os.environ.get("S3_VERIFY_SSL", "1") not in ("0", "false"), config=Config(**config))
            _clients[pid, kind].meta.events.register("after-call.s3", _refuse_missing_bucket)
        return _clients[pid, kind]


def _refuse_missing_bucket(parsed: dict, context: dict, **_: Any) -> None:
    """Every request's answer, before botocore raises its error: a missing bucket is a set-up
    mistake, which deserves one line naming the bucket rather than a traceback through botocore."""
    error = parsed.get("Error", {})
    if error.get("Code") == "NoSuchBucket":
        bucket = error.get("BucketName") or context.get("input_params", {}).get("Bucket")
        server = os.environ.get("S3_ENDPOINT") or "AWS"
        raise MissingBucket(f"{S3_PREFIX}{bucket}: no such bucket on {server}; create it, or point "
                            f"[layout] data_root and results_root at a bucket that exists")


def _s3():
    return s3_client("data", retries={"max_attempts": 5, "mode": "standard"}, max_pool_connections=_UPLOADS_AT_ONCE)


def bucket_key(location: str) -> tuple[str, str]:
    bucket, _, key = str(location)[len(S3_PREFIX):].partition("/")
    return bucket, key.rstrip("/")


def is_missing(error: Exception) -> bool:
    return (getattr(error, "response", None) or {}).get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")


def _head(location: str) -> dict | None:
    from botocore.exceptions import ClientError

    bucket, key = bucket_key(location)
    try:
        return _s3().head_object(Bucket=bucket, Key=key)
    except ClientError as error:
        if is_missing(error):
            return None
        raise


def s3_objects(folder: str) -> Iterator[tuple[str, dict]]:
    """(key relative to `folder`, listing entry) of every object below the S3 folder `folder`."""
    bucket, key = bucket_key(folder)
    prefix = f"{key}/" if key else ""
    for page in _s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for entry in page.get("Contents", []):
            yield entry["Key"][len(prefix):], entry


# Reading.

def exists(location: str | os.PathLike) -> bool:
    """Whether the file `location` exists."""
    return _head(str(location)) is not None if is_remote(location) else os.path.isfile(location)


def is_dir(location: str | os.PathLike) -> bool:
    if not is_remote(location):
        return os.path.isdir(location)
    return next(s3_objects(str(location)), None) is not None


def written_since(location: str | os.PathLike, since_ns: int) -> bool:
    """Whether the file `location` exists and was written at or after `since_ns` (time.time_ns())."""
    if is_remote(location):
        head = _head(str(location))
        # S3 keeps whole seconds: an object written within the second of `since_ns` counts.
        return head is not None and head["LastModified"].timestamp() >= since_ns // 1_000_000_000
    try:
        return os.stat(location).st_mtime_ns >= since_ns
    except FileNotFoundError:
        return False


def read_bytes(location: str | os.PathLike) -> bytes:
    if is_remote(location):
        bucket, key = bucket_key(str(location))
        from botocore.exceptions import ClientError
        try:
            return _s3().get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as error:
            if is_missing(error):
                raise FileNotFoundError(f"no such object: {location}") from error
            raise
    return Path(location).read_bytes()


@contextlib.contextmanager
def open_binary(location: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A seekable binary handle on a file's bytes (an S3 object is fetched whole)."""
    if is_remote(location):
        yield io.BytesIO(read_bytes(location))
    else:
        with open(location, "rb") as handle:
            yield handle


def read_text(location: str | os.PathLike) -> str:
    return read_bytes(location).decode("utf-8")


def read_json(location: str | os.PathLike) -> Any:
    return json.loads(read_bytes(location))


def sha256_file(location: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    if is_remote(location):
        bucket, key = bucket_key(str(location))
        for chunk in _s3().get_object(Bucket=bucket, Key=key)["Body"].iter_chunks(chunk_size):
            digest.update(chunk)
    else:
        with open(location, "rb") as handle:
            while chunk := handle.read(chunk_size):
                digest.update(chunk)
    return digest.hexdigest()


def size_of(location: str | os.PathLike) -> int:
    """Bytes in the file or folder `location` (0 if it does not exist)."""
    if is_remote(location):
        head = _head(str(location))
        return head["ContentLength"] if head else sum(entry["Size"] for _, entry in s3_objects(str(location)))
    path = Path(location)
    if path.is_file():
        return path.stat().st_size
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def keys_below(folder: str | os.PathLike, keep: Callable[[str], bool]) -> list[str]:
    """Relative POSIX paths of every file below `folder` whose name, and the name of every folder
    on its way, `keep` accepts; in no particular order (the caller decides which files and in what
    order: see pipeline.datafiles). Locally `os.scandir` rather than `Path.rglob`: on 20k files,
    pathlib's per-file objects made listing cost more than a shard; a folder `keep` refuses is not
    entered."""
    if is_remote(folder):
        return [key for key, _ in s3_objects(str(folder)) if all(map(keep, key.split("/")))]
    keys, pending = [], [""]
    while pending:
        prefix = pending.pop()
        with os.scandir(os.path.join(folder, prefix)) as entries:
            for entry in entries:
                if not keep(entry.name):
                    continue
                key = f"{prefix}/{entry.name}" if prefix else entry.name
                if entry.is_dir():
                    pending.append(key)
                elif entry.is_file():
                    keys.append(key)
    return keys


def glob(pattern: str | os.PathLike) -> list[str]:
    """Files and folders matching `pattern`, with wildcards in any of its components, sorted (for
    a reader; a caller that picks one by its place, the newest say, orders them itself)."""
    pattern = str(pattern)
    if not is_remote(pattern):
        return sorted(local_glob.glob(pattern))
    parts = pattern[len(S3_PREFIX):].split("/")
    fixed = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), len(parts))
    # Listed from the deepest fixed folder: all of it that can match, and nothing beside it.
    cut = min(fixed, len(parts) - 1)
    if cut < 1:
        raise ValueError(f"{pattern}: a pattern needs a fixed bucket before its wildcards")
    base = S3_PREFIX + "/".join(parts[:cut])
    wanted = parts[cut:]
    found = set()
    for key, _ in s3_objects(base):
        components = key.split("/")
        if len(components) >= len(wanted) and all(
                fnmatch.fnmatchcase(component, part) for component, part in zip(components, wanted)):
            found.add(join(base, *components[:len(wanted)]))
    return sorted(found)


# Writing. Each write to S3 first runs the write checks: pipeline.locks adds each S3 lease this process
# holds, so that a holder whose lock has ended changes nothing more there. (An S3 lock guards outputs
# on S3: see tasks.base.)

_write_checks: list[Callable[[], None]] = []


@contextlib.contextmanager
def checking_writes(check: Callable[[], None]) -> Iterator[None]:
    """While inside, every write to S3 through this module first calls `check`, which raises to stop it."""
    _write_checks.append(check)
    try:
        yield
    finally:
        _write_checks.remove(check)


def check_writes() -> None:
    """Run every write check (see `checking_writes`)."""
    for check in list(_write_checks):
        check()


def _fsync(path: str | os.PathLike) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a local temporary file; once the block succeeds, it becomes `final` in one step.

    Locally, a sibling of `final`, flushed to disk and renamed onto it, so that after a power
    loss `final` holds either its old content or the whole new one. On S3, a file in the system's
    temporary folder, uploaded as one object.
    """
    remote = is_remote(final)
    if remote:
        folder = None
    else:
        folder = Path(final).parent
        folder.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f"{name(final)}{TEMP_INFIX}", dir=folder)
    os.close(handle)
    temp = Path(temp_name)
    try:
        yield temp
        if remote:
            check_writes()
            bucket, key = bucket_key(str(final))
            _s3().upload_file(str(temp), bucket, key)
        else:
            _fsync(temp)
            os.replace(temp, final)
            _fsync(folder)
    finally:
        temp.unlink(missing_ok=True)


def write_bytes(location: str | os.PathLike, data: bytes) -> None:
    if is_remote(location):
        check_writes()
        bucket, key = bucket_key(str(location))
        _s3().put_object(Bucket=bucket, Key=key, Body=data)
        return
    with atomic_path(location) as temp:
        temp.write_bytes(data)


def write_json(location: str | os.PathLike, payload: Any) -> None:
    write_bytes(location, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


def flush_to_disk() -> None:
    """Flush everything written locally so far to disk. Called before a marker vouches for files
    that were not written through `atomic_path`: an extracted archive, TensorFlow's checkpoints
    and export. (What S3 acknowledged is stored already.)"""
    os.sync()


def publish_folder(local_folder: str | os.PathLike, final: str | os.PathLike, marker_name: str) -> None:
    """Put the complete local folder `local_folder`, its marker already inside, at `final`, replacing
    what is there: locally in one rename; on S3 file by file, the marker last."""
    remove_tree(final)
    if not is_remote(final):
        os.rename(local_folder, final)
        flush_to_disk()
        return
    # Every file, hidden ones too: locally the rename moves them all.
    keys = [os.path.relpath(os.path.join(root, file), local_folder)
            for root, _, files in os.walk(local_folder) for file in files]
    keys.remove(marker_name)
    bucket, prefix = bucket_key(str(final))
    upload = lambda key: _s3().upload_file(os.path.join(local_folder, key), bucket, f"{prefix}/{key}")  # noqa: E731
    with ThreadPoolExecutor(_UPLOADS_AT_ONCE) as pool:
        list(pool.map(upload, keys))
    # The uploads may take longer than a lease: the marker only while it is still held.
    check_writes()
    upload(marker_name)


def remove_tree(location: str | os.PathLike) -> None:
    """Remove a file or folder if it exists."""
    if is_remote(location):
        check_writes()
        bucket, key = bucket_key(str(location))
        keys = [key] + [f"{key}/{relative}" for relative, _ in s3_objects(str(location))]
        for start in range(0, len(keys), 1000):
            _s3().delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[start:start + 1000]],
                                                        "Quiet": True})
        return
    path = Path(location)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def remove_temporaries(patterns: Iterable[str | os.PathLike]) -> None:
    """Remove what matches the glob `patterns` (wildcards in any component): files or folders a
    crashed run left."""
    for pattern in patterns:
        for leftover in glob(pattern):
            log.warning("removing %s, left by an interrupted run", leftover)
            remove_tree(leftover)
