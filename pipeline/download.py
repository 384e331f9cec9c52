"""Download stage: fetch an image-folder archive or a CSV manifest of images into `<class>/<file>`.

Every scheme (http, https, file) goes through `fetch`, so the embedded dataset exercises the
same code as a remote source. The files are fetched and extracted into a local work folder; the
class folders then appear at their final location with `download.json` last (locally in one
rename, with the marker already inside), so a crash never leaves a folder that looks complete.
"""
from __future__ import annotations

import base64
import csv
import functools
import hashlib
import http.client
import ipaddress
import logging
import os
import re
import socket
import stat
import tarfile
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
import weakref
import zipfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path, PurePosixPath

from pipeline.errors import (ChecksumMismatch, ConfigError, DatasetError, DownloadError, RefusedURL, SizeCapExceeded,
                             UnsafeArchiveError)
from pipeline import storage
from pipeline.datafiles import visible, visible_keys
from pipeline.storage import TEMP_INFIX, atomic_path, flush_to_disk, publish_folder, remove_tree, sha256_file, write_json
from pipeline.progress import Progress

log = logging.getLogger(__name__)

SCHEMES = ("http", "https", "file")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
MANIFEST_SUFFIX = ".csv"
_CHUNK = 1 << 16
# Caps on what an archive may extract to: a bomb is refused before anything is written.
MAX_EXTRACTED_BYTES = 20 << 30
MAX_COMPRESSION_RATIO = 100.0
# What each member costs beside its bytes (an inode and a directory entry; a folder takes a 4 KiB
# block): 50,000 empty folders in a 235 KB tar.gz take 206 MB, a bomb made of entries, not bytes.
MEMBER_OVERHEAD_BYTES = 1 << 10
# Caps on what a download may fetch: one manifest image, and the whole download (the archive, or
# every manifest image together), so that `file:///dev/zero` or an endless body fails instead of
# filling the disk.
MAX_IMAGE_BYTES = 64 << 20
MAX_DOWNLOAD_BYTES = 20 << 30
# Addresses never fetched: link-local ones (169.254.169.254 is the metadata service of AWS, GCP and
# Azure) and the other clouds' metadata services, which hand out credentials to whoever asks.
METADATA_ADDRESSES = frozenset(map(ipaddress.ip_address, ("100.100.100.200", "fd00:ec2::254")))
METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata.goog", "metadata"})
_CHECKSUM_FRAGMENT = re.compile(r"sha256=([0-9a-fA-F]{64})")
# The query parameters of a presigned URL's signature, by scheme: each scheme's marker (lower case)
# and the parameters it signs with, dropped only where the marker is present, so that a server's
# own `se` or `Expires` still counts. From AWS's SigV4 and SigV2 query authentication, Google
# Cloud Storage's V4 and V2 signed URLs, and Azure's service, account and user delegation SAS.
_SIGNING_PARAMETERS = {
    "x-amz-signature": {"x-amz-algorithm", "x-amz-credential", "x-amz-date", "x-amz-expires",
                        "x-amz-signedheaders", "x-amz-signature", "x-amz-security-token"},
    "awsaccesskeyid": {"awsaccesskeyid", "signature", "expires", "x-amz-security-token"},
    "x-goog-signature": {"x-goog-algorithm", "x-goog-credential", "x-goog-date", "x-goog-expires",
                         "x-goog-signedheaders", "x-goog-signature"},
    "googleaccessid": {"googleaccessid", "signature", "expires"},
    "sig": {"sig", "sv", "ss", "srt", "sp", "st", "se", "sip", "spr", "si", "sr", "sdd", "ses", "skoid", "sktid",
            "skt", "ske", "sks", "skv", "saoid", "suoid", "scid"},
}


def split_checksum(url: str) -> tuple[str, str | None]:
    """(the URL to fetch, its expected sha256 or None) from a source URL that may end in
    `#sha256=<64 hex digits>`, as pip's requirement URLs do: the checksum travels with the URL it
    belongs to, so a changed URL is never checked against another one's checksum."""
    base, _, fragment = url.partition("#")
    if not fragment:
        return url, None
    match = _CHECKSUM_FRAGMENT.fullmatch(fragment)
    if match is None:
        raise ConfigError(f"source URL {redact_url(url)!r} ends in '#{fragment}'; the only fragment understood is "
                          "'#sha256=' followed by the 64 hex digits of the file's sha256")
    return base, match.group(1).lower()


def _check_scheme(url: str) -> urllib.parse.SplitResult:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in SCHEMES:
        raise ConfigError(f"URL {redact_url(url)!r} has scheme {parsed.scheme!r}; expected one of {', '.join(SCHEMES)}")
    return parsed


def source_kind(url: str) -> str:
    """'archive' or 'manifest', from the URL's path; raise ConfigError for anything else."""
    path = _check_scheme(url).path.lower()
    if path.endswith(ARCHIVE_SUFFIXES):
        return "archive"
    if path.endswith(MANIFEST_SUFFIX):
        return "manifest"
    raise ConfigError(f"source URL {redact_url(url)!r} must end in one of {', '.join(ARCHIVE_SUFFIXES)} (an image-folder "
                      f"archive) or {MANIFEST_SUFFIX} (a manifest of url,label lines)")


def redact_url(url: str) -> str:
    """`url` as it may be shown or stored: its user information (`user:password@`, or a token as
    the user name) becomes `***@`; a presigned URL's signing parameters (see `_SIGNING_PARAMETERS`)
    are left out, so that a re-signed URL of one object stays one URL (and one version); and the
    query left, if any, becomes a hash of it, which still tells two queries apart."""
    parsed = urllib.parse.urlsplit(url)
    if "@" not in parsed.netloc and not parsed.query:
        return url
    host = parsed.netloc.rpartition("@")[2]
    userinfo = "***@" if "@" in parsed.netloc else ""
    pairs = urllib.parse.parse_qsl(parsed.query, keep_blank_values=True)
    names = {name.lower() for name, _ in pairs}
    signing = set().union(*(params for marker, params in _SIGNING_PARAMETERS.items() if marker in names))
    kept = urllib.parse.urlencode([(name, value) for name, value in pairs if name.lower() not in signing])
    query = f"redacted-sha256={hashlib.sha256(kept.encode()).hexdigest()[:16]}" if kept else ""
    return urllib.parse.urlunsplit((parsed.scheme, f"{userinfo}{host}", parsed.path, query, parsed.fragment))


_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


def _reached(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list:
    """The addresses a connection to `address` reaches, to be judged instead of it: an IPv6 address
    that embeds an IPv4 one (IPv4-mapped or -compatible, NAT64, 6to4, Teredo's server and client)
    reaches that one, and `ipaddress` counts most of those forms as global whatever they embed."""
    if address.version == 4:
        return [address]
    embedded = [address.ipv4_mapped, address.sixtofour, *(address.teredo or ())]
    if any(address in network for network in _NAT64) or (address in _IPV4_COMPATIBLE and int(address) > 1):
        embedded.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return [reached for reached in embedded if reached] or [address]


def _is_private(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return any(not reached.is_global for reached in _reached(address))


def _refused_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address, private_ok: bool) -> str | None:
    """Why `address` may not be connected to, or None."""
    if any(reached.is_link_local or reached in METADATA_ADDRESSES for reached in _reached(address)):
        return "a link-local or cloud-metadata address, never fetched"
    if _is_private(address) and not private_ok:
        return ("a private or loopback address, named from a public one (allow it with "
                "--Download-allow-private-addresses)")
    return None


class FetchGuard:
    """What the fetches of one download share: which addresses they may connect to, the byte cap
    of the whole download, and a stop signal that ends them all at once.

    Every connection, a redirect's included, is made here: the host name is resolved, each
    address checked, and the socket connected to a checked address, so a name that resolves
    differently a second time cannot slip past. `private_ok` allows private and loopback
    addresses; link-local and cloud-metadata ones are refused always, before any connection.
    Environment proxies are not used: through one, the address connected to would be the proxy's.
    The address each thread last connected to is kept (`peer`): after a fetch, it is the one its
    body came from, a redirect's target included, to be judged without asking DNS again.
    """

    def __init__(self, *, private_ok: bool = True, max_total_bytes: int = MAX_DOWNLOAD_BYTES):
        self.private_ok, self.max_total_bytes = private_ok, max_total_bytes
        self.stopped = threading.Event()
        self._total, self._lock = 0, threading.Lock()
        self._sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._peers = threading.local()
        self.opener = urllib.request.OpenerDirector()
        for handler in (urllib.request.UnknownHandler(), _GuardedHTTPHandler(self), _GuardedHTTPSHandler(self),
                        urllib.request.HTTPDefaultErrorHandler(), _HTTPOnlyRedirectHandler(),
                        urllib.request.FileHandler(), urllib.request.HTTPErrorProcessor()):
            self.opener.add_handler(handler)

    def check_host(self, host: str, port: int) -> list[tuple]:
        """The addresses `host` resolves to, each allowed; RefusedURL otherwise, before any connection."""
        if host.rstrip(".").lower() in METADATA_HOSTS:
            raise RefusedURL(f"host {host!r} is a cloud metadata service, never fetched")
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        for *_, sockaddr in infos:
            why = _refused_address(ipaddress.ip_address(sockaddr[0].partition("%")[0]), self.private_ok)
            if why:
                raise RefusedURL(f"host {host!r} is {sockaddr[0]}, {why}")
        return infos

    def connect(self, address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None) -> socket.socket:
        """socket.create_connection, to a checked address of `address`'s host only."""
        host, port = address
        error = None
        for family, kind, proto, _, sockaddr in self.check_host(host, port):
            sock = socket.socket(family, kind, proto)
            try:
                if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                    sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
                self._peers.address = sockaddr[0].partition("%")[0]
                return sock
            except OSError as failure:
                error = failure
                sock.close()
        raise error

    def peer(self) -> str | None:
        """The address this thread's last connection went to; None if it made none."""
        return getattr(self._peers, "address", None)

    def count(self, size: int, url: str) -> None:
        """Add `size` fetched bytes to the download's total; SizeCapExceeded past its cap."""
        with self._lock:
            self._total += size
            total = self._total
        if total > self.max_total_bytes:
            raise SizeCapExceeded(f"{redact_url(url)}: the download passed its cap of {self.max_total_bytes} bytes "
                                  "in all (raise --Download-max-download-bytes to allow more)")

    def register(self, sock: socket.socket) -> None:
        """Have `stop` end what `sock` is reading (once connected: TLS replaces the plain socket)."""
        self._sockets.add(sock)
        if self.stopped.is_set():
            raise _Stopped()

    def stop(self) -> None:
        """End every fetch: pending ones do not start, and blocked reads return at once."""
        self.stopped.set()
        for sock in list(self._sockets):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # not connected yet, or already closed


class _Stopped(Exception):
    """A fetch ended because another one failed first (see FetchGuard.stop)."""


class _GuardedConnection:
    def __init__(self, *args, guard: FetchGuard, **kwargs):
        super().__init__(*args, **kwargs)
        self._guard = guard
        self._create_connection = guard.connect

    def connect(self):
        super().connect()
        self._guard.register(self.sock)


class _GuardedHTTPConnection(_GuardedConnection, http.client.HTTPConnection):
    pass


class _GuardedHTTPSConnection(_GuardedConnection, http.client.HTTPSConnection):
    pass


class _GuardedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, guard: FetchGuard):
        super().__init__()
        self._connection = functools.partial(_GuardedHTTPConnection, guard=guard)

    def http_open(self, req):
        return self.do_open(self._connection, req)


class _GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, guard: FetchGuard):
        super().__init__()
        self._connection = functools.partial(_GuardedHTTPSConnection, guard=guard)

    def https_open(self, req):
        return self.do_open(self._connection, req, context=self._context)


class _HTTPOnlyRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Redirects to http(s) only (urllib's own also follows ftp, which would bypass the guard),
    with no credentials for another host."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        target = urllib.parse.urljoin(req.full_url, newurl)
        if urllib.parse.urlsplit(target).scheme not in ("http", "https"):
            raise RefusedURL(f"redirects to {redact_url(target)}; only http(s) redirects are followed")
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and new.host != req.host:
            new.remove_header("Authorization")  # the credentials are the first host's, not the next one's
        return new


def fetch(url: str, destination: Path, sha256: str | None = None, *, retries: int = 4,
          backoff_s: float = 0.5, timeout_s: float = 60.0, progress: Progress | None = None,
          max_bytes: int = MAX_DOWNLOAD_BYTES, guard: FetchGuard | None = None) -> str:
    """Stream `url` into `destination` atomically and return its sha256.

    Connection errors, stalls longer than `timeout_s`, bodies shorter than their Content-Length
    and 5xx replies are retried with exponential backoff. A retry after part of the body arrived
    asks for the rest with a `Range` request (and starts over if the server ignores it). Any
    other HTTP error (a 404 above all), an address `guard` refuses and a body over `max_bytes`
    fail at once. A failure leaves nothing at `destination`.
    """
    local = _check_scheme(url).scheme == "file"
    guard = guard or FetchGuard(max_total_bytes=max_bytes)
    shown = redact_url(url)
    destination = Path(destination)
    with atomic_path(destination) as partial:
        for attempt in range(retries + 1):
            try:
                _fetch_into(url, partial, timeout_s, progress, max_bytes, guard)
                break
            except RefusedURL as error:
                raise RefusedURL(f"{shown}: {error}") from None
            except urllib.error.HTTPError as error:
                if error.code < 500 or attempt == retries:
                    raise DownloadError(f"{shown}: HTTP {error.code} {error.reason}") from error
                reason = f"HTTP {error.code}"
            except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException) as error:
                if guard.stopped.is_set():
                    raise _Stopped() from error
                reason = _describe(error, timeout_s)
                if local:  # a file that cannot be read will not appear by waiting
                    raise DownloadError(f"{shown}: {reason}") from error
                if attempt == retries:
                    raise DownloadError(f"{shown}: {reason} (gave up after {retries + 1} attempts)") from error
            delay = backoff_s * 2 ** attempt
            log.warning("fetching %s failed (%s); retrying in %.1f s, resuming after %d bytes",
                        shown, reason, delay, partial.stat().st_size)
            if guard.stopped.wait(delay):
                raise _Stopped()
        digest = sha256_file(partial)
        if sha256 and digest != sha256.lower():
            raise ChecksumMismatch(f"{shown}: sha256 is {digest}, expected {sha256.lower()}")
    return digest


def _describe(error: BaseException, timeout_s: float) -> str:
    reason = getattr(error, "reason", error)
    if isinstance(reason, TimeoutError):
        return f"no data for {timeout_s:g} s (timed out)"
    if isinstance(error, http.client.IncompleteRead):
        return f"the body ended {error.expected} bytes short of its Content-Length"
    return f"{type(reason).__name__}: {reason}"


def _file_name(url: str) -> str:
    return PurePosixPath(urllib.parse.urlsplit(url).path).name


def _request(url: str, headers: dict[str, str]) -> urllib.request.Request:
    """A request for `url`; its `user:password@`, which urllib would take for part of the host
    name, sent as HTTP Basic authentication instead."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.username is None:
        return urllib.request.Request(url, headers=headers)
    credentials = f"{urllib.parse.unquote(parsed.username)}:{urllib.parse.unquote(parsed.password or '')}"
    headers = {**headers, "Authorization": f"Basic {base64.b64encode(credentials.encode()).decode()}"}
    return urllib.request.Request(parsed._replace(netloc=parsed.netloc.rpartition("@")[2]).geturl(), headers=headers)


def _fetch_into(url: str, partial: Path, timeout_s: float, progress: Progress | None, max_bytes: int,
                guard: FetchGuard) -> None:
    """Fetch `url` into `partial`, continuing after the bytes already there when the server allows."""
    name = _file_name(url)
    have = partial.stat().st_size
    request = _request(url, {"Range": f"bytes={have}-"} if have else {})
    too_big = f"{redact_url(url)}: more than {max_bytes} bytes, its cap"
    with guard.opener.open(request, timeout=timeout_s) as response:
        resumed = have > 0 and getattr(response, "status", 200) == 206 and \
            response.headers.get("Content-Range", "").startswith(f"bytes {have}-")
        received = have if resumed else 0
        length = response.headers.get("Content-Length")
        expected = received + int(length) if length is not None else None
        if expected is not None and expected > max_bytes:
            raise SizeCapExceeded(f"{too_big} (its Content-Length says {expected})")
        with open(partial, "ab" if resumed else "wb") as out:
            while chunk := response.read(_CHUNK):
                if guard.stopped.is_set():
                    raise _Stopped()
                out.write(chunk)
                received += len(chunk)
                guard.count(len(chunk), url)
                if received > max_bytes:
                    raise SizeCapExceeded(too_big)
                if progress:
                    progress(received, expected, "bytes", name)
        if guard.stopped.is_set():
            raise _Stopped()
        if expected is not None and received != expected:
            raise http.client.IncompleteRead(b"", expected - received)


def download_dataset(source_url: str, target: str, marker_name: str, *,
                     workers: int = 8, retries: int = 4, backoff_s: float = 0.5, timeout_s: float = 60.0,
                     skip_failed_images: bool = False, max_image_bytes: int = MAX_IMAGE_BYTES,
                     max_download_bytes: int = MAX_DOWNLOAD_BYTES, allow_private_addresses: bool = False,
                     progress: Progress | None = None) -> dict:
    """Fetch `source_url` into `target/<class>/<file>` and write `target/<marker_name>` inside it.

    A URL ending in `#sha256=<hex>` is checked against that sha256 (see `split_checksum`). In an
    archive, files beside the class folders (a LICENSE, a README) are kept but listed under
    "ignored"; hidden files and folders are dropped and listed under "hidden" (see `drop_hidden`).
    In a manifest, an image that cannot be fetched fails the download, naming its URL,
    unless `skip_failed_images`: then it is left out and listed under "failed" in the marker
    (see `fetch_manifest` for what a manifest may name and the byte caps). The marker shows the
    source URL redacted (`redact_url`). Returns the summary written to the marker.
    """
    kind = source_kind(source_url)
    source_url, sha256 = split_checksum(source_url)
    if storage.is_remote(target):
        work_parent = None
    else:
        # Beside the target, so that the finished folder is renamed into place on one filesystem.
        work_parent = storage.parent(target)
        Path(work_parent).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{storage.name(target)}{TEMP_INFIX}", dir=work_parent))
    try:
        tree = work / "tree"
        # The source URL is the user's own: it may be on a private address, never a link-local one.
        source_guard = FetchGuard(private_ok=True, max_total_bytes=max_download_bytes)
        if kind == "archive":
            archive = work / _file_name(source_url)
            digest = fetch(source_url, archive, sha256, retries=retries, backoff_s=backoff_s,
                           timeout_s=timeout_s, progress=progress, max_bytes=max_download_bytes, guard=source_guard)
            extract_archive(archive, tree)
            hidden = drop_hidden(tree)
            root, ignored = class_root(tree)
            failed = []
        else:
            manifest = work / "manifest.csv"
            digest = fetch(source_url, manifest, sha256, retries=retries, backoff_s=backoff_s, timeout_s=timeout_s,
                           max_bytes=max_download_bytes, guard=source_guard)
            root, ignored, hidden = tree, [], []
            failed = fetch_manifest(manifest, source_url, root, workers=workers, retries=retries,
                                    backoff_s=backoff_s, timeout_s=timeout_s, skip_failed=skip_failed_images,
                                    max_image_bytes=max_image_bytes, max_download_bytes=max_download_bytes,
                                    allow_private_addresses=allow_private_addresses, progress=progress,
                                    origin_address=source_guard.peer())
        counts = {c.name: len(visible_keys(c)) for c in sorted(root.iterdir()) if c.is_dir() and visible(c.name)}
        if len(counts) < 2:
            raise DatasetError(f"{redact_url(source_url)}: found class folders {sorted(counts)}; expected at least two "
                               "folders, one per class, each holding images (beside them, loose files are "
                               "ignored, and one wrapping folder is looked through)")
        summary = {"source_url": redact_url(source_url), "sha256": digest, "kind": kind, "images_per_class": counts,
                   "ignored": ignored, "hidden": hidden, "failed": failed}
        flush_to_disk()
        write_json(root / marker_name, summary)
        publish_folder(root, target, marker_name)
        return summary
    finally:
        remove_tree(work)


def _inside(root: Path, name: str) -> bool:
    resolved = (root / name).resolve()
    return resolved == root or root in resolved.parents


def extract_archive(archive: Path, target: Path, *, max_bytes: int = MAX_EXTRACTED_BYTES,
                    max_ratio: float = MAX_COMPRESSION_RATIO) -> None:
    """Extract a tar or zip archive into `target`, refusing, before anything is written, any member
    that is not a plain file or folder, that would land outside `target`, or that takes the
    extracted total (each member's size plus `MEMBER_OVERHEAD_BYTES`) past `max_bytes` or past
    `max_ratio` times the archive's size (a bomb). The error names the member."""
    target.mkdir(parents=True, exist_ok=True)
    root = target.resolve()
    budget = _ExtractionBudget(archive, max_bytes, max_ratio)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zipped:
            for info in zipped.infolist():
                if stat.S_ISLNK(info.external_attr >> 16) or not _inside(root, info.filename):
                    raise UnsafeArchiveError(f"{archive.name}: member {info.filename!r} is a link or points "
                                             f"outside the extraction folder")
                budget.add(info.filename, info.file_size)
            # zipfile stops each member at its declared size, so the checked sizes are the written ones.
            zipped.extractall(target)
        return
    try:
        tar = tarfile.open(archive)
    except tarfile.TarError as error:
        raise DownloadError(f"{archive.name}: not a tar or zip archive ({error})") from error
    with tar:
        for member in tar:
            if not (member.isfile() or member.isdir()) or not _inside(root, member.name):
                raise UnsafeArchiveError(f"{archive.name}: member {member.name!r} is not a plain file or folder "
                                         "inside the extraction folder")
            budget.add(member.name, member.size)
        # The 'data' filter re-checks paths and drops modes and owners a dataset has no use for.
        tar.extractall(target, filter="data")


class _ExtractionBudget:
    """Running total of an archive's declared member sizes, each plus `MEMBER_OVERHEAD_BYTES`,
    against the caps on size and ratio."""

    def __init__(self, archive: Path, max_bytes: int, max_ratio: float):
        self._archive, self._total = archive, 0
        self._limit = min(max_bytes, max_ratio * max(archive.stat().st_size, 1))
        self._why = (f"more than {max_bytes} bytes" if max_bytes <= self._limit else
                     f"more than {max_ratio:g} times the archive's {archive.stat().st_size} bytes")

    def add(self, member: str, size: int) -> None:
        self._total += size + MEMBER_OVERHEAD_BYTES
        if self._total > self._limit:
            raise UnsafeArchiveError(f"{self._archive.name}: member {member!r} takes the extracted size to "
                                     f"{self._total} bytes, {self._why} (a decompression bomb?)")


def drop_hidden(tree: Path) -> list[str]:
    """Remove every hidden file and folder below `tree` (see `datafiles.visible`: a name starting
    with '.' or '__MACOSX') and return their paths relative to `tree`, a folder's with a trailing
    '/'. They are never data (every reader skips them), and published they could pose as the
    pipeline's own files, such as a stage's index entry (`index.ENTRY_FILE`)."""
    hidden = []
    for folder, folders, files in os.walk(tree):
        for name in sorted(files + folders):
            if not visible(name):
                path = Path(folder) / name
                hidden.append(path.relative_to(tree).as_posix() + ("/" if name in folders else ""))
                remove_tree(path)
        folders[:] = [name for name in folders if visible(name)]
    return sorted(hidden)


def class_root(tree: Path) -> tuple[Path, list[str]]:
    """The folder whose sub-folders are the classes, and the loose files passed on the way there.

    Published archives often wrap their class folders in one top folder, with a LICENSE or README
    beside them (TensorFlow's flower_photos.tgz does both). A folder holding a single visible
    sub-folder cannot be the class root, so it is looked through; loose files beside the classes
    are not images of any class, so they are ignored, as Keras' `image_dataset_from_directory`
    ignores them. The ignored files are returned as paths relative to `tree`.
    """
    root, ignored = tree, []
    while True:
        entries = sorted(entry for entry in root.iterdir() if visible(entry.name))
        folders = [entry for entry in entries if entry.is_dir()]
        ignored += [entry.relative_to(tree).as_posix() for entry in entries if not entry.is_dir()]
        if len(folders) != 1:
            return root, ignored
        root = folders[0]


def _absolute_file_url(url: str) -> str:
    """A `file:` URL with its path made absolute: `file:data/m.csv` is relative to the working
    directory, which urljoin cannot know (it would resolve `imgs/1.png` to `file:///data/imgs/1.png`)."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.path.startswith("/"):
        return url
    return Path(urllib.parse.unquote(parsed.path)).absolute().as_uri()


def read_manifest(manifest: Path, manifest_url: str) -> list[tuple[int, str, str]]:
    """(line number, absolute URL, label) of each image; relative URLs resolve against the
    manifest's own URL. A manifest fetched over http(s) may name http(s) images only: a `file:`
    line there would read this machine's files, so it is refused (RefusedURL)."""
    remote = urllib.parse.urlsplit(manifest_url).scheme != "file"
    base = manifest_url if remote else _absolute_file_url(manifest_url)
    shown = redact_url(manifest_url)
    rows = []
    with open(manifest, newline="", encoding="utf-8") as handle:
        for line_number, row in enumerate(csv.reader(handle), start=1):
            if not row or (line_number == 1 and [c.strip().lower() for c in row] == ["url", "label"]):
                continue
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                raise DatasetError(f"{shown}: line {line_number} is {row!r}; expected 'url,label'")
            url, label = urllib.parse.urljoin(base, row[0].strip()), row[1].strip()
            if not visible(label) or "/" in label or "\\" in label:
                raise DatasetError(f"{shown}: line {line_number} has label {label!r}; a label becomes a "
                                   "folder name, so it may not contain '/' or start with '.' or '__MACOSX'")
            scheme = urllib.parse.urlsplit(url).scheme
            allowed = ("http", "https") if remote else SCHEMES
            if scheme not in allowed:
                raise RefusedURL(f"{shown}: line {line_number} names {redact_url(url)}; a manifest fetched over "
                                 f"{urllib.parse.urlsplit(manifest_url).scheme} may name "
                                 f"{' or '.join(allowed)} images only")
            rows.append((line_number, url, label))
    if not rows:
        raise DatasetError(f"{shown}: the manifest lists no images; expected 'url,label' lines")
    return rows


def image_paths(rows: list[tuple[int, str, str]], target: Path, manifest_url: str) -> list[tuple[int, str, Path]]:
    """(line number, URL, file) of each image: `target/<label>/<name from the URL>`. Two URLs with
    one name in one class are kept apart by a hash of the URL before the extension; one URL twice
    in one class (or a name that still collides) fails, naming both lines."""
    line_of_name: dict[tuple[str, str], int] = {}
    line_of_url: dict[tuple[str, str], int] = {}
    jobs = []
    for line_number, url, label in rows:
        name = PurePosixPath(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name or f"line{line_number}"
        if not visible(name):
            raise DatasetError(f"{redact_url(manifest_url)}: line {line_number} names {redact_url(url)}, whose file "
                               f"name {name!r} is hidden (it starts with '.' or '__MACOSX'): every reader skips "
                               "such files; expected an image's name")
        if (label, name) in line_of_name and (label, url) not in line_of_url:
            stem, dot, suffix = name.partition(".")
            name = f"{stem}-{hashlib.sha256(url.encode()).hexdigest()[:8]}{dot}{suffix}"
        earlier = line_of_url.get((label, url)) or line_of_name.get((label, name))
        if earlier:
            raise DatasetError(f"{redact_url(manifest_url)}: lines {earlier} and {line_number} both put "
                               f"{redact_url(url)} in class {label!r} as {name!r}; expected each image once")
        line_of_name[label, name] = line_of_url[label, url] = line_number
        jobs.append((line_number, url, target / label / name))
    return jobs


def private_origin(url: str, address: str | None) -> bool:
    """Whether a manifest at `url`, fetched from `address` (the peer its body came from, see
    `FetchGuard.peer`), is local: a file, or served from a private or loopback address. The host
    name is not resolved again: a DNS server that answered a public address for the fetch could
    answer 127.0.0.1 for a second look. No address known: not local."""
    if urllib.parse.urlsplit(url).scheme == "file":
        return True
    return address is not None and _is_private(ipaddress.ip_address(address))


def fetch_manifest(manifest: Path, manifest_url: str, target: Path, *, workers: int, retries: int,
                   backoff_s: float, timeout_s: float = 60.0, skip_failed: bool = False,
                   max_image_bytes: int = MAX_IMAGE_BYTES, max_download_bytes: int = MAX_DOWNLOAD_BYTES,
                   allow_private_addresses: bool = False, progress: Progress | None = None,
                   origin_address: str | None = None) -> list[dict[str, str]]:
    """Fetch every image the manifest lists, in parallel, into `target/<label>/<file>`.

    A manifest fetched from a public address (`origin_address`, the one its body came from; see
    `private_origin`) may not name private or loopback ones (unless `allow_private_addresses`); link-local and cloud-metadata addresses are refused always. Each
    image may hold `max_image_bytes`, all of them together `max_download_bytes`. Returns the
    images skipped (url, label, error) when `skip_failed`; otherwise the first failure stops the
    other fetches and is raised, naming its line and URL. A refused URL or a passed cap fails the
    download even under `skip_failed`: the manifest is not what it claims to be.
    """
    jobs = image_paths(read_manifest(manifest, manifest_url), target, manifest_url)
    guard = FetchGuard(private_ok=allow_private_addresses or private_origin(manifest_url, origin_address),
                       max_total_bytes=max_download_bytes)
    shown = redact_url(manifest_url)
    failed = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(fetch, url, path, retries=retries, backoff_s=backoff_s, timeout_s=timeout_s,
                               max_bytes=max_image_bytes, guard=guard): (line_number, url, path.parent.name)
                   for line_number, url, path in jobs}
        try:
            for done, future in enumerate(as_completed(futures), start=1):
                line_number, url, label = futures[future]
                try:
                    future.result()
                except DownloadError as error:
                    if not skip_failed or isinstance(error, (RefusedURL, SizeCapExceeded)):
                        raise type(error)(f"{shown}: line {line_number}: {error}") from error
                    log.warning("skipping %s (label %s): %s", redact_url(url), label, error)
                    failed.append({"url": redact_url(url), "label": label, "error": str(error)})
                if progress:
                    progress(done, len(futures), "files", f"{len(failed)} failed" if failed else "")
        except BaseException:
            guard.stop()
            for pending in futures:
                pending.cancel()
            raise
    return sorted(failed, key=lambda item: item["url"])
