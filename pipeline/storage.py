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
import email.utils
import fcntl
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
import socket
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from pipeline.errors import ConfigError, LockLost, MissingBucket

log = logging.getLogger(__name__)

S3_PREFIX = "s3://"
# Temporary siblings carry this infix, so that what a crash left is recognisable as such.
TEMP_INFIX = ".tmp-"
# Names that operating systems and archivers leave beside data (.DS_Store, AppleDouble ._*, __MACOSX).
_HIDDEN_PREFIXES = (".", "__MACOSX")
# An S3 lock not renewed for this long belongs to a process that died: it is taken over.
LOCK_TTL_S = 30.0
# Another TTL, for tests and for operators on a slow link. Each lock says its holder's, by which
# other processes judge it.
LOCK_TTL_VARIABLE = "PIPELINE_S3_LOCK_TTL_S"
_UPLOADS_AT_ONCE = 16
# A lock request answered by a conflict (409: a concurrent conditional request on it), or a takeover
# another taker won, is tried again after this, doubled at each try; a release after this many tries.
_LOCK_RETRY_S = 0.1
_RELEASE_TRIES = 5


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


def visible(file_name: str) -> bool:
    """Whether a file or folder name is data rather than something an OS or archiver left."""
    return not file_name.startswith(_HIDDEN_PREFIXES)


def tf_path(location: str | os.PathLike) -> str:
    """`location` as TensorFlow's file functions take it; for S3, with tensorflow-io's plugin
    loaded. Only in processes that end with os._exit (see the module's docstring)."""
    if is_remote(location):
        importlib.import_module("tensorflow_io")  # registers s3:// with tf.io.gfile
    return str(location)


# S3, through boto3: clients per process, since a client made before a fork is not the child's.
_clients: dict[tuple[int, Any], Any] = {}


def _client(kind: Any, **config: Any):
    """This process's client of `kind`, made with botocore `config` the first time."""
    pid = os.getpid()
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
    return _client("data", retries={"max_attempts": 5, "mode": "standard"}, max_pool_connections=_UPLOADS_AT_ONCE)


def _lock_s3(ttl_s: float):
    """The client of a lock's requests. botocore's defaults (60 s to connect, 60 s to read, 5 attempts)
    would let a renewal on a dead network outlive the lease many times over, and keep a holder that
    must stop waiting for minutes: each attempt here gets a sixth of the TTL, and two are made."""
    # At least a second each, though: against a busy server a shorter wait fails live leases.
    wait_s = max(ttl_s / 6, 1.0)
    return _client(("lock", ttl_s), connect_timeout=wait_s, read_timeout=wait_s,
                   retries={"max_attempts": 2, "mode": "standard"})


def _bucket_key(location: str) -> tuple[str, str]:
    bucket, _, key = str(location)[len(S3_PREFIX):].partition("/")
    return bucket, key.rstrip("/")


def _is_missing(error: Exception) -> bool:
    return (getattr(error, "response", None) or {}).get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")


def _head(location: str) -> dict | None:
    from botocore.exceptions import ClientError

    bucket, key = _bucket_key(location)
    try:
        return _s3().head_object(Bucket=bucket, Key=key)
    except ClientError as error:
        if _is_missing(error):
            return None
        raise


def _objects(folder: str) -> Iterator[tuple[str, dict]]:
    """(key relative to `folder`, listing entry) of every object below the S3 folder `folder`."""
    bucket, key = _bucket_key(folder)
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
    return next(_objects(str(location)), None) is not None


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
        bucket, key = _bucket_key(str(location))
        from botocore.exceptions import ClientError
        try:
            return _s3().get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as error:
            if _is_missing(error):
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
        bucket, key = _bucket_key(str(location))
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
        return head["ContentLength"] if head else sum(entry["Size"] for _, entry in _objects(str(location)))
    path = Path(location)
    if path.is_file():
        return path.stat().st_size
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def visible_keys(folder: str | os.PathLike) -> list[str]:
    """Relative POSIX paths of every file below `folder`, leaving out hidden files and anything in
    hidden folders; sorted by path components. Locally `os.scandir` rather than `Path.rglob`: on
    20k files, pathlib's per-file objects made listing cost more than a shard."""
    if is_remote(folder):
        keys = [key for key, _ in _objects(str(folder)) if all(map(visible, key.split("/")))]
        return sorted(keys, key=lambda key: key.split("/"))
    keys, pending = [], [""]
    while pending:
        prefix = pending.pop()
        with os.scandir(os.path.join(folder, prefix)) as entries:
            for entry in entries:
                if not visible(entry.name):
                    continue
                key = f"{prefix}/{entry.name}" if prefix else entry.name
                if entry.is_dir():
                    pending.append(key)
                elif entry.is_file():
                    keys.append(key)
    return sorted(keys, key=lambda key: key.split("/"))


def glob(pattern: str | os.PathLike) -> list[str]:
    """Files and folders matching `pattern`, with wildcards in any of its components, sorted."""
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
    for key, _ in _objects(base):
        components = key.split("/")
        if len(components) >= len(wanted) and all(
                fnmatch.fnmatchcase(component, part) for component, part in zip(components, wanted)):
            found.add(join(base, *components[:len(wanted)]))
    return sorted(found)


# Writing. Each write to S3 first checks the S3 leases this process holds (see `Lease`): a holder
# whose lock has ended changes nothing more there. (An S3 lock guards outputs on S3: see tasks.stage.)

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
            check_leases()
            bucket, key = _bucket_key(str(final))
            _s3().upload_file(str(temp), bucket, key)
        else:
            _fsync(temp)
            os.replace(temp, final)
            _fsync(folder)
    finally:
        temp.unlink(missing_ok=True)


def write_bytes(location: str | os.PathLike, data: bytes) -> None:
    if is_remote(location):
        check_leases()
        bucket, key = _bucket_key(str(location))
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
    bucket, prefix = _bucket_key(str(final))
    upload = lambda key: _s3().upload_file(os.path.join(local_folder, key), bucket, f"{prefix}/{key}")  # noqa: E731
    with ThreadPoolExecutor(_UPLOADS_AT_ONCE) as pool:
        list(pool.map(upload, keys))
    # The uploads may take longer than a lease: the marker only while it is still held.
    check_leases()
    upload(marker_name)


def remove_tree(location: str | os.PathLike) -> None:
    """Remove a file or folder if it exists."""
    if is_remote(location):
        check_leases()
        bucket, key = _bucket_key(str(location))
        keys = [key] + [f"{key}/{relative}" for relative, _ in _objects(str(location))]
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


# Locks: flock on a local file; on S3, a lease: an object created only if absent and renewed while
# held, every write conditional on the ETag its holder last saw.

@contextlib.contextmanager
def file_lock(lock_path: str | os.PathLike, holder: str = "", guards: str = "") -> Iterator[Lease | None]:
    """Hold an exclusive lock named `lock_path` across processes (on S3: across machines); block
    until it is free, saying first what it waits for when `holder` describes it. `guards`, the
    location being written under the lock, is written into the lock, for `held_locks`.

    On S3 it yields the `Lease`. While one is held, every write through this module checks it
    first and raises LockLost once it has ended; so does leaving the block."""
    locking = _s3_lock if is_remote(lock_path) else _local_lock
    with locking(str(lock_path), holder, guards) as lease:
        yield lease


@contextlib.contextmanager
def _local_lock(lock_path: str, holder: str, guards: str) -> Iterator[None]:
    Path(lock_path).parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if holder:
                log.warning("waiting for another process, which is producing %s", holder)
            fcntl.flock(lock, fcntl.LOCK_EX)
        lock.truncate(0)
        lock.write(guards)
        lock.flush()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def lock_ttl_s() -> float:
    """Seconds an S3 lock lives without renewal: PIPELINE_S3_LOCK_TTL_S, else LOCK_TTL_S. Written
    into each lock, so that others judge it by its holder's setting."""
    text = os.environ.get(LOCK_TTL_VARIABLE, "")
    try:
        ttl_s = float(text) if text else LOCK_TTL_S
    except ValueError:
        ttl_s = 0.0
    if not ttl_s > 0:
        raise ConfigError(f"{LOCK_TTL_VARIABLE}={text!r}: expected a number of seconds above 0")
    return ttl_s


def _condition_failed(error: Exception) -> str | None:
    """How a conditional request failed: 'changed' (412: the ETag is not the one given, or the key
    exists), 'gone' (404), 'conflict' (409: a concurrent conditional request; read again and
    retry), or None for any other error."""
    code = (getattr(error, "response", None) or {}).get("Error", {}).get("Code")
    if code in ("PreconditionFailed", "412"):
        return "changed"
    if code in ("ConditionalRequestConflict", "409"):
        return "conflict"
    return "gone" if _is_missing(error) else None


# Why a conditional write of a held lock failed.
_LOST = {"changed": "another process took it over", "gone": "it is gone: taken over and let go, or deleted"}


@dataclass
class _LockState:
    etag: str
    guards: str
    ttl_s: float
    age_s: float
    nonce: str

    def stale(self) -> bool:
        # S3 times objects, and its Date header, in whole seconds: one more, so that a lease is
        # never taken before its holder's TTL has really passed.
        return self.age_s > self.ttl_s + 1


def _lock_state(lock_path: str) -> _LockState | None:
    """The lock object's ETag, its holder's TTL, and its age by the S3 server's clock (the response's
    Date minus the object's LastModified, both the server's), so that no host's clock is trusted.
    None when there is no lock."""
    from botocore.exceptions import ClientError

    bucket, key = _bucket_key(lock_path)
    try:
        response = _lock_s3(lock_ttl_s()).get_object(Bucket=bucket, Key=key)
    except ClientError as error:
        if _is_missing(error):
            return None
        raise
    content = json.loads(response["Body"].read())
    server_now = email.utils.parsedate_to_datetime(response["ResponseMetadata"]["HTTPHeaders"]["date"])
    # A lock written before locks said their TTL is judged by this process's.
    return _LockState(response["ETag"], content.get("guards", ""), float(content.get("ttl_s") or lock_ttl_s()),
                      (server_now - response["LastModified"]).total_seconds(), content.get("nonce", ""))


class Lease:
    """An S3 lock this process holds. Every write of it is conditional on the ETag of its previous
    one, so a holder whose lock another process took over learns it (412) instead of writing over
    it. It counts as lost once a renewal is refused, or once none has succeeded for two thirds of
    the TTL (by this host's monotonic clock, from before the request, hence before S3's
    LastModified): before any other process may judge it stale. A renewal that fails before then
    is tried again at the next one."""

    def __init__(self, location: str, guards: str, ttl_s: float):
        self.location, self.guards, self.ttl_s = location, guards, ttl_s
        self.etag = ""
        self.renewed_at = time.monotonic()
        self.lost: str | None = None
        # The nonces of this holder's writes since its last answered one: a write whose answer was
        # lost (a timeout) may have been applied, botocore's retry of it then refused, and the
        # lock's ETag is then that write's, which this holder does not know.
        self._unanswered: set[str] = set()

    def _put(self, condition: dict[str, str]) -> str | None:
        """Write the lock under `condition`: None once written, else how the condition failed."""
        bucket, key = _bucket_key(self.location)
        # A fresh nonce in every write: S3 gives identical bytes the same ETag, which would let a
        # condition on an old ETag pass.
        nonce = uuid.uuid4().hex
        body = json.dumps({"guards": self.guards, "host": socket.gethostname(), "pid": os.getpid(),
                           "ttl_s": self.ttl_s, "nonce": nonce}).encode()
        sent_at = time.monotonic()
        self._unanswered.add(nonce)
        try:
            self.etag = _lock_s3(self.ttl_s).put_object(Bucket=bucket, Key=key, Body=body, **condition)["ETag"]
        except Exception as error:
            if failure := _condition_failed(error):
                return failure
            raise
        self._unanswered.clear()
        self.renewed_at = sent_at
        return None

    def adopt(self, state: _LockState | None) -> bool:
        """Whether the lock seen (`state`) is one of this holder's own writes, applied though its
        answer was lost: then its ETag becomes this holder's, rather than the lock counting as
        another process's."""
        if state is None or state.nonce not in self._unanswered:
            return False
        self.etag = state.etag
        self._unanswered.clear()
        return True

    def _unanswered_own_write(self) -> bool:
        """Whether the lock now is this holder's own write whose answer was lost (then adopted)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return bool(self._unanswered) and self.adopt(_lock_state(self.location))
        except (BotoCoreError, ClientError) as error:
            log.error("could not read the lock %s (%r)", self.location, error)
            return False

    def acquire(self) -> bool:
        return self._put({"IfNoneMatch": "*"}) is None

    def take_over(self, stale_etag: str) -> bool:
        """Replace a stale lock, only if it is still the one seen: of two takers, one wins."""
        return self._put({"IfMatch": stale_etag}) is None

    def renew(self) -> bool:
        """Renew the lease; False once it is lost."""
        failure = self._put({"IfMatch": self.etag})
        if failure == "changed" and self._unanswered_own_write():
            failure = self._put({"IfMatch": self.etag})
        if failure in ("changed", "gone"):
            self.lose(_LOST[failure])
        # After a conflict (409) the next renewal tries again, within the TTL.
        return self.lost is None

    def lose(self, reason: str) -> None:
        if self.lost is None:
            self.lost = reason
            log.error("lost the lock %s: %s", self.location, reason)

    def expired(self) -> bool:
        """Whether no renewal has succeeded for two thirds of the TTL."""
        return time.monotonic() - self.renewed_at > self.ttl_s * 2 / 3

    def check(self) -> None:
        """Raise LockLost if the lease has ended."""
        if self.expired():
            self.lose(f"not renewed for {time.monotonic() - self.renewed_at:.1f} s")
        if self.lost is not None:
            raise LockLost(f"lost the lock {self.location} ({self.lost}); stopped before writing more, since "
                           f"another process may now be writing {self.guards or 'what it guards'}")

    def release(self) -> None:
        """Delete the lock, only if it is still this holder's; never another's. When S3 cannot be
        reached, or keeps answering with conflicts, the lock is left, saying so: it goes stale
        after one TTL and others take it over. That does not fail the holder, whose work was done
        under its lease."""
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = _bucket_key(self.location)
        for attempt in range(_RELEASE_TRIES):
            try:
                _lock_s3(self.ttl_s).delete_object(Bucket=bucket, Key=key, IfMatch=self.etag)
                return
            except (BotoCoreError, ClientError) as error:
                failure, reason = _condition_failed(error), error
            if failure == "gone":
                # Deleted already: this delete, applied and then retried. (Had the lock gone stale
                # and been taken over meanwhile, `check` fails the holder all the same.)
                return
            if failure == "changed":
                if self._unanswered_own_write():
                    continue  # this holder's last renewal, applied though unanswered: delete that one
                self.lose(_LOST[failure])
                return
            if failure is None:
                log.error("could not release the lock %s (%r): others take it over in %.0f s",
                          self.location, reason, self.ttl_s)
                return
            time.sleep(_LOCK_RETRY_S * 2 ** attempt)
        log.error("could not release the lock %s: %d conflicting requests; others take it over in %.0f s",
                  self.location, _RELEASE_TRIES, self.ttl_s)


# The leases this process holds now, which every write checks.
_held_leases: list[Lease] = []


def check_leases() -> None:
    for lease in list(_held_leases):
        lease.check()


def _keep_renewing(lease: Lease, released: threading.Event) -> None:
    while not released.wait(lease.ttl_s / 6):
        try:
            if not lease.renew():
                return
        except Exception as error:  # noqa: BLE001 - whatever keeps failing ends the lease, saying why
            if lease.expired():
                lease.lose(f"renewing it failed: {error!r}")
                return


@contextlib.contextmanager
def _s3_lock(lock_path: str, holder: str, guards: str) -> Iterator[Lease]:
    lease = Lease(lock_path, guards, lock_ttl_s())
    waiting, retries = False, 0
    while not lease.acquire():
        state = _lock_state(lock_path)
        if lease.adopt(state):
            break  # its own write, applied though its answer was lost
        if state is None or state.stale():
            if state is not None and lease.take_over(state.etag):
                log.warning("took over %s, not renewed for %.0f s: its holder is gone", lock_path, state.age_s)
                break
            # Let go between our two requests, a concurrent request (409), or another taker won:
            # look again soon, though not in a busy loop against S3.
            time.sleep(min(1.0, _LOCK_RETRY_S * 2 ** retries))
            retries += 1
            continue
        if holder and not waiting:
            log.warning("waiting for another process, which is producing %s", holder)
            waiting = True
        time.sleep(min(1.0, lease.ttl_s / 4))
    released = threading.Event()
    renewer = threading.Thread(target=_keep_renewing, args=(lease, released), name=f"renew {lock_path}", daemon=True)
    renewer.start()
    _held_leases.append(lease)
    try:
        yield lease
    finally:
        _held_leases.remove(lease)
        released.set()
        # A renewal in flight ends within its client's timeouts; one stuck beyond them must not
        # keep a holder that has to stop from stopping (the thread is a daemon).
        renewer.join(timeout=lease.ttl_s)
        if renewer.is_alive():
            # Its write may still land, after which a release by the ETag known now would fail.
            log.error("could not release the lock %s: its renewal still waits for S3; others take it over in %.0f s",
                      lock_path, lease.ttl_s)
        else:
            lease.release()
    # Lost while inside, after the last write: the task still fails, since another process may
    # have been producing the same output alongside.
    lease.check()


def held_locks(folder: str | os.PathLike) -> list[str]:
    """What the locks in `folder` that some process holds now guard (see `file_lock`); on S3, the
    locks that are not stale by the server's clock."""
    if is_remote(folder):
        states = [_lock_state(join(folder, key)) for key, _ in _objects(str(folder))
                  if key.endswith(".lock") and "/" not in key]
        return [state.guards for state in states if state is not None and not state.stale()]
    held = []
    for lock_path in sorted(Path(folder).glob("*.lock")) if Path(folder).is_dir() else []:
        with open(lock_path) as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                held.append(lock.read())
            else:
                fcntl.flock(lock, fcntl.LOCK_UN)
    return held
