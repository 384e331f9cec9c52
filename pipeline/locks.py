"""Locks across processes, and across machines for locations on S3: flock on a local file; on S3,
a lease: an object created only if absent and renewed while held, every write conditional on the
ETag its holder last saw. While a lease is held, every write to S3 through `pipeline.storage`
checks it first (see `storage.checking_writes`), so that a holder whose lock has ended changes
nothing more there.
"""
from __future__ import annotations

import contextlib
import email.utils
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pipeline import storage
from pipeline.errors import ConfigError, LockLost
from pipeline.storage import bucket_key, is_missing, is_remote, join, s3_client, s3_objects

# Where a lock lives and how long it lasts never changes what a stage writes: versions ignore this code.
AFFECTS_RESULTS = False

log = logging.getLogger(__name__)

# An S3 lock not renewed for this long belongs to a process that died: it is taken over.
LOCK_TTL_S = 30.0
# Another TTL, for tests and for operators on a slow link. Each lock says its holder's, by which
# other processes judge it.
LOCK_TTL_VARIABLE = "PIPELINE_S3_LOCK_TTL_S"

# A lock request answered by a conflict (409: a concurrent conditional request on it), or a takeover
# another taker won, is tried again after this, doubled at each try; a release after this many tries.
_LOCK_RETRY_S = 0.1
_RELEASE_TRIES = 5


def _lock_s3(ttl_s: float):
    """The client of a lock's requests. botocore's defaults (60 s to connect, 60 s to read, 5 attempts)
    would let a renewal on a dead network outlive the lease many times over, and keep a holder that
    must stop waiting for minutes: each attempt here gets a sixth of the TTL, and two are made."""
    # At least a second each, though: against a busy server a shorter wait fails live leases.
    wait_s = max(ttl_s / 6, 1.0)
    return s3_client(("lock", ttl_s), connect_timeout=wait_s, read_timeout=wait_s,
                   retries={"max_attempts": 2, "mode": "standard"})


@contextlib.contextmanager
def file_lock(lock_path: str | os.PathLike, holder: str = "", guards: str = "") -> Iterator[Lease | None]:
    """Hold an exclusive lock named `lock_path` across processes (on S3: across machines); block
    until it is free, saying first what it waits for when `holder` describes it. `guards`, the
    location being written under the lock, is written into the lock, for `held_locks`.

    On S3 it yields the `Lease`. While one is held, every write to S3 through `pipeline.storage`
    checks it first and raises LockLost once it has ended; so does leaving the block."""
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
    return "gone" if is_missing(error) else None


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

    bucket, key = bucket_key(lock_path)
    try:
        response = _lock_s3(lock_ttl_s()).get_object(Bucket=bucket, Key=key)
    except ClientError as error:
        if is_missing(error):
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
        bucket, key = bucket_key(self.location)
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

        bucket, key = bucket_key(self.location)
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


def check_leases() -> None:
    """LockLost once an S3 lease this process holds has ended: for writes that do not go through
    `pipeline.storage`, which checks them itself (TensorFlow's checkpoints, a cluster's roles)."""
    storage.check_writes()


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
    try:
        with storage.checking_writes(lease.check):
            yield lease
    finally:
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
        states = [_lock_state(join(folder, key)) for key, _ in s3_objects(str(folder))
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
