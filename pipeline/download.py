"""Download stage: fetch an image-folder archive or a CSV manifest of images into `<class>/<file>`.

Every scheme (http, https, file) goes through `fetch`, so the embedded dataset exercises the
same code as a remote source. The files are fetched and extracted into a local work folder; the
class folders then appear at their final location with `download.json` last (locally in one
rename, with the marker already inside), so a crash never leaves a folder that looks complete.
"""
from __future__ import annotations

import csv
import http.client
import logging
import re
import stat
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path, PurePosixPath

from pipeline.errors import ChecksumMismatch, ConfigError, DatasetError, DownloadError, UnsafeArchiveError
from pipeline import storage
from pipeline.storage import (TEMP_INFIX, atomic_path, flush_to_disk, publish_folder, remove_tree, sha256_file, visible,
                              visible_keys, write_json)
from pipeline.progress import Progress

log = logging.getLogger(__name__)

SCHEMES = ("http", "https", "file")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
MANIFEST_SUFFIX = ".csv"
_CHUNK = 1 << 16
# Caps on what an archive may extract to: a bomb is refused before anything is written.
MAX_EXTRACTED_BYTES = 20 << 30
MAX_COMPRESSION_RATIO = 100.0
_CHECKSUM_FRAGMENT = re.compile(r"sha256=([0-9a-fA-F]{64})")


def split_checksum(url: str) -> tuple[str, str | None]:
    """(the URL to fetch, its expected sha256 or None) from a source URL that may end in
    `#sha256=<64 hex digits>`, as pip's requirement URLs do: the checksum travels with the URL it
    belongs to, so a changed URL is never checked against another one's checksum."""
    base, _, fragment = url.partition("#")
    if not fragment:
        return url, None
    match = _CHECKSUM_FRAGMENT.fullmatch(fragment)
    if match is None:
        raise ConfigError(f"source URL {url!r} ends in '#{fragment}'; the only fragment understood is "
                          "'#sha256=' followed by the 64 hex digits of the file's sha256")
    return base, match.group(1).lower()


def _check_scheme(url: str) -> urllib.parse.SplitResult:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in SCHEMES:
        raise ConfigError(f"URL {url!r} has scheme {parsed.scheme!r}; expected one of {', '.join(SCHEMES)}")
    return parsed


def source_kind(url: str) -> str:
    """'archive' or 'manifest', from the URL's path; raise ConfigError for anything else."""
    path = _check_scheme(url).path.lower()
    if path.endswith(ARCHIVE_SUFFIXES):
        return "archive"
    if path.endswith(MANIFEST_SUFFIX):
        return "manifest"
    raise ConfigError(f"source URL {url!r} must end in one of {', '.join(ARCHIVE_SUFFIXES)} (an image-folder "
                      f"archive) or {MANIFEST_SUFFIX} (a manifest of url,label lines)")


def fetch(url: str, destination: Path, sha256: str | None = None, *, retries: int = 4,
          backoff_s: float = 0.5, timeout_s: float = 60.0, progress: Progress | None = None) -> str:
    """Stream `url` into `destination` atomically and return its sha256.

    Connection errors, stalls longer than `timeout_s`, bodies shorter than their Content-Length
    and 5xx replies are retried with exponential backoff. A retry after part of the body arrived
    asks for the rest with a `Range` request (and starts over if the server ignores it). Any
    other HTTP error (a 404 above all) fails at once. A digest mismatch leaves nothing at
    `destination`.
    """
    local = _check_scheme(url).scheme == "file"
    destination = Path(destination)
    with atomic_path(destination) as partial:
        for attempt in range(retries + 1):
            try:
                _fetch_into(url, partial, timeout_s, progress)
                break
            except urllib.error.HTTPError as error:
                if error.code < 500 or attempt == retries:
                    raise DownloadError(f"{url}: HTTP {error.code} {error.reason}") from error
                reason = f"HTTP {error.code}"
            except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException) as error:
                reason = _describe(error, timeout_s)
                if local:  # a file that cannot be read will not appear by waiting
                    raise DownloadError(f"{url}: {reason}") from error
                if attempt == retries:
                    raise DownloadError(f"{url}: {reason} (gave up after {retries + 1} attempts)") from error
            delay = backoff_s * 2 ** attempt
            log.warning("fetching %s failed (%s); retrying in %.1f s, resuming after %d bytes",
                        url, reason, delay, partial.stat().st_size)
            time.sleep(delay)
        digest = sha256_file(partial)
        if sha256 and digest != sha256.lower():
            raise ChecksumMismatch(f"{url}: sha256 is {digest}, expected {sha256.lower()}")
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


def _fetch_into(url: str, partial: Path, timeout_s: float, progress: Progress | None) -> None:
    """Fetch `url` into `partial`, continuing after the bytes already there when the server allows."""
    name = _file_name(url)
    have = partial.stat().st_size
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        resumed = have > 0 and getattr(response, "status", 200) == 206 and \
            response.headers.get("Content-Range", "").startswith(f"bytes {have}-")
        received = have if resumed else 0
        length = response.headers.get("Content-Length")
        expected = received + int(length) if length is not None else None
        with open(partial, "ab" if resumed else "wb") as out:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                received += len(chunk)
                if progress:
                    progress(received, expected, "bytes", name)
        if expected is not None and received != expected:
            raise http.client.IncompleteRead(b"", expected - received)


def download_dataset(source_url: str, target: str, marker_name: str, *,
                     workers: int = 8, retries: int = 4, backoff_s: float = 0.5, timeout_s: float = 60.0,
                     skip_failed_images: bool = False, progress: Progress | None = None) -> dict:
    """Fetch `source_url` into `target/<class>/<file>` and write `target/<marker_name>` inside it.

    A URL ending in `#sha256=<hex>` is checked against that sha256 (see `split_checksum`). In an
    archive, files beside the class folders (a LICENSE, a README) are kept but listed under
    "ignored". In a manifest, an image that cannot be fetched fails the download, naming its URL,
    unless `skip_failed_images`: then it is left out and listed under "failed" in the marker.
    Returns the summary written to the marker.
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
        if kind == "archive":
            archive = work / _file_name(source_url)
            digest = fetch(source_url, archive, sha256, retries=retries, backoff_s=backoff_s,
                           timeout_s=timeout_s, progress=progress)
            extract_archive(archive, tree)
            root, ignored = class_root(tree)
            failed = []
        else:
            manifest = work / "manifest.csv"
            digest = fetch(source_url, manifest, sha256, retries=retries, backoff_s=backoff_s, timeout_s=timeout_s)
            root, ignored = tree, []
            failed = fetch_manifest(manifest, source_url, root, workers=workers, retries=retries,
                                    backoff_s=backoff_s, timeout_s=timeout_s, skip_failed=skip_failed_images,
                                    progress=progress)
        counts = {c.name: len(visible_keys(c)) for c in sorted(root.iterdir()) if c.is_dir() and visible(c.name)}
        if len(counts) < 2:
            raise DatasetError(f"{source_url}: found class folders {sorted(counts)}; expected at least two "
                               "folders, one per class, each holding images (beside them, loose files are "
                               "ignored, and one wrapping folder is looked through)")
        summary = {"source_url": source_url, "sha256": digest, "kind": kind, "images_per_class": counts,
                   "ignored": ignored, "failed": failed}
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
    extracted total past `max_bytes` or past `max_ratio` times the archive's size (a bomb). The
    error names the member."""
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
    """Running total of an archive's declared member sizes, against the caps on size and ratio."""

    def __init__(self, archive: Path, max_bytes: int, max_ratio: float):
        self._archive, self._total = archive, 0
        self._limit = min(max_bytes, max_ratio * max(archive.stat().st_size, 1))
        self._why = (f"more than {max_bytes} bytes" if max_bytes <= self._limit else
                     f"more than {max_ratio:g} times the archive's {archive.stat().st_size} bytes")

    def add(self, member: str, size: int) -> None:
        self._total += size
        if self._total > self._limit:
            raise UnsafeArchiveError(f"{self._archive.name}: member {member!r} takes the extracted size to "
                                     f"{self._total} bytes, {self._why} (a decompression bomb?)")


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


def read_manifest(manifest: Path, manifest_url: str) -> list[tuple[str, str]]:
    """(absolute URL, label) pairs; relative URLs resolve against the manifest's own URL."""
    rows = []
    with open(manifest, newline="", encoding="utf-8") as handle:
        for line_number, row in enumerate(csv.reader(handle), start=1):
            if not row or (line_number == 1 and [c.strip().lower() for c in row] == ["url", "label"]):
                continue
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                raise DatasetError(f"{manifest_url}: line {line_number} is {row!r}; expected 'url,label'")
            url, label = row[0].strip(), row[1].strip()
            if label.startswith(".") or "/" in label or "\\" in label:
                raise DatasetError(f"{manifest_url}: line {line_number} has label {label!r}; a label becomes a "
                                   "folder name, so it may not contain '/' or start with '.'")
            rows.append((urllib.parse.urljoin(manifest_url, url), label))
    if not rows:
        raise DatasetError(f"{manifest_url}: the manifest lists no images; expected 'url,label' lines")
    return rows


def fetch_manifest(manifest: Path, manifest_url: str, target: Path, *, workers: int, retries: int,
                   backoff_s: float, timeout_s: float = 60.0, skip_failed: bool = False,
                   progress: Progress | None = None) -> list[dict[str, str]]:
    """Fetch every image the manifest lists, in parallel, into `target/<label>/<file>`.

    Returns the images skipped (url, label, error) when `skip_failed`; otherwise the first
    failure is raised, naming its URL.
    """
    jobs = []
    taken: set[tuple[str, str]] = set()
    for index, (url, label) in enumerate(read_manifest(manifest, manifest_url)):
        name = PurePosixPath(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name or f"{index:06d}"
        if (label, name) in taken:
            name = f"{index:06d}-{name}"
        taken.add((label, name))
        jobs.append((url, label, target / label / name))
    failed = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(fetch, url, path, retries=retries, backoff_s=backoff_s, timeout_s=timeout_s):
                   (url, label) for url, label, path in jobs}
        for done, future in enumerate(as_completed(futures), start=1):
            try:
                future.result()
            except DownloadError as error:
                if not skip_failed:
                    for pending in futures:
                        pending.cancel()
                    raise
                url, label = futures[future]
                log.warning("skipping %s (label %s): %s", url, label, error)
                failed.append({"url": url, "label": label, "error": str(error)})
            if progress:
                progress(done, len(futures), "files", f"{len(failed)} failed" if failed else "")
    return sorted(failed, key=lambda item: item["url"])
