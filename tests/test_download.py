import base64
import hashlib
import http.server
import io
import ipaddress
import json
import socket
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from pipeline import download
from pipeline.errors import (ChecksumMismatch, ConfigError, DatasetError, DownloadError, RefusedURL, SizeCapExceeded,
                             UnsafeArchiveError)
from tests.conftest import EMBEDDED_ARCHIVE, tar_bytes


def png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (6, 6), value).save(buffer, format="PNG")
    return buffer.getvalue()


DATASET = {"cat/a.png": png(10), "cat/b.png": png(20), "dog/c.png": png(200)}


def test_archive_over_http_retries_after_503_and_verifies_sha256(file_server, tmp_path):
    archive = tar_bytes(DATASET)
    file_server.files["/set.tar.gz"] = archive
    file_server.faults["/set.tar.gz"] = ["503", "503"]
    target = tmp_path / "raw"

    pinned = file_server.url("/set.tar.gz") + "#sha256=" + hashlib.sha256(archive).hexdigest()
    summary = download.download_dataset(pinned, target, "download.json", backoff_s=0.01)

    assert file_server.requests["/set.tar.gz"] == 3
    assert summary["images_per_class"] == {"cat": 2, "dog": 1}
    assert (target / "dog" / "c.png").read_bytes() == DATASET["dog/c.png"]
    assert json.loads((target / "download.json").read_text())["sha256"] == hashlib.sha256(archive).hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"], "temporary folders were left behind"


def test_checksum_mismatch_fails_and_leaves_nothing(file_server, tmp_path):
    file_server.files["/set.tar.gz"] = tar_bytes(DATASET)
    with pytest.raises(ChecksumMismatch, match="expected " + "0" * 64):
        download.download_dataset(file_server.url("/set.tar.gz") + "#sha256=" + "0" * 64, tmp_path / "raw",
                                  "download.json")
    assert list(tmp_path.iterdir()) == []


def test_404_fails_at_once_naming_the_url(file_server, tmp_path):
    url = file_server.url("/missing.tar.gz")
    with pytest.raises(DownloadError, match=f"{url}: HTTP 404"):
        download.download_dataset(url, tmp_path / "raw", "download.json", backoff_s=0.01)
    assert file_server.requests["/missing.tar.gz"] == 1


def test_persistent_503_gives_up_after_the_retries(file_server, tmp_path):
    file_server.files["/set.tar.gz"] = tar_bytes(DATASET)
    file_server.faults["/set.tar.gz"] = ["503"] * 10
    with pytest.raises(DownloadError, match="HTTP 503"):
        download.fetch(file_server.url("/set.tar.gz"), tmp_path / "f", retries=2, backoff_s=0.01)
    assert file_server.requests["/set.tar.gz"] == 3
    assert not (tmp_path / "f").exists()


def test_tar_member_escaping_the_target_is_refused(file_server, tmp_path):
    file_server.files["/evil.tar.gz"] = tar_bytes({**DATASET, "../escaped.png": png(1)})
    with pytest.raises(UnsafeArchiveError, match=r"'\.\./escaped\.png'"):
        download.download_dataset(file_server.url("/evil.tar.gz"), tmp_path / "out" / "raw", "download.json")
    assert not (tmp_path / "out" / "escaped.png").exists()
    assert not (tmp_path / "escaped.png").exists()
    assert list((tmp_path / "out").iterdir()) == []


def test_zip_archive_wrapped_in_one_top_folder(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zipped:
        for name, data in DATASET.items():
            zipped.writestr(f"pets/{name}", data)
    (tmp_path / "pets.zip").write_bytes(buffer.getvalue())

    summary = download.download_dataset((tmp_path / "pets.zip").as_uri(), tmp_path / "raw", "download.json")

    assert summary["images_per_class"] == {"cat": 2, "dog": 1}
    assert (tmp_path / "raw" / "cat" / "a.png").is_file()


def test_manifest_images_are_fetched_in_parallel_into_label_folders(file_server, tmp_path):
    for name, data in DATASET.items():
        file_server.files[f"/img/{name}"] = data
    file_server.files["/list.csv"] = b"url,label\nimg/cat/a.png,cat\nimg/cat/b.png,cat\n" + \
        file_server.url("/img/dog/c.png").encode() + b",dog\n"

    summary = download.download_dataset(file_server.url("/list.csv"), tmp_path / "raw", "download.json",
                                        workers=3)

    assert summary["kind"] == "manifest"
    assert (tmp_path / "raw" / "cat" / "b.png").read_bytes() == DATASET["cat/b.png"]
    assert (tmp_path / "raw" / "dog" / "c.png").read_bytes() == DATASET["dog/c.png"]


def test_manifest_with_a_missing_image_names_its_url(file_server, tmp_path):
    file_server.files["/img/cat/a.png"] = DATASET["cat/a.png"]
    file_server.files["/list.csv"] = b"img/cat/a.png,cat\nimg/dog/gone.png,dog\n"
    with pytest.raises(DownloadError, match="/img/dog/gone.png: HTTP 404"):
        download.download_dataset(file_server.url("/list.csv"), tmp_path / "raw", "download.json",
                                  backoff_s=0.01)
    assert not (tmp_path / "raw").exists()


def test_archive_with_one_class_is_rejected(tmp_path):
    (tmp_path / "one.tar.gz").write_bytes(tar_bytes({"cat/a.png": png(1), "cat/b.png": png(2)}))
    with pytest.raises(DatasetError, match="at least two"):
        download.download_dataset((tmp_path / "one.tar.gz").as_uri(), tmp_path / "raw", "download.json")


@pytest.mark.parametrize("url, message", [
    ("ftp://example.org/set.tar.gz", "scheme 'ftp'"),
    ("https://example.org/set.rar", "must end in one of"),
])
def test_unsupported_sources_are_refused_before_any_fetch(url, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        download.download_dataset(url, tmp_path / "raw", "download.json")


def test_connection_reset_mid_body_resumes_with_a_range_request(file_server, tmp_path):
    archive = tar_bytes(DATASET) * 3
    file_server.files["/set.tar.gz"] = archive
    file_server.faults["/set.tar.gz"] = ["reset"]

    digest = download.fetch(file_server.url("/set.tar.gz"), tmp_path / "set.tar.gz", backoff_s=0.01)

    assert (tmp_path / "set.tar.gz").read_bytes() == archive and digest == hashlib.sha256(archive).hexdigest()
    [first, second] = file_server.ranges["/set.tar.gz"]
    assert first is None and second == f"bytes={len(archive) // 2}-"
    assert [p.name for p in tmp_path.iterdir()] == ["set.tar.gz"]


def test_body_shorter_than_its_content_length_is_detected(file_server, tmp_path):
    file_server.files["/set.tar.gz"] = tar_bytes(DATASET)
    file_server.faults["/set.tar.gz"] = ["short"] * 3
    with pytest.raises(DownloadError, match=r"body ended \d+ bytes short of its Content-Length .gave up after 2"):
        download.fetch(file_server.url("/set.tar.gz"), tmp_path / "f", retries=1, backoff_s=0.01)
    assert list(tmp_path.iterdir()) == []


def test_a_stalled_server_times_out_with_a_clear_error(file_server, tmp_path):
    file_server.files["/set.tar.gz"] = tar_bytes(DATASET)
    file_server.faults["/set.tar.gz"] = ["stall"] * 2
    file_server.stall_s = 3
    with pytest.raises(DownloadError, match=r"no data for 0.3 s \(timed out\) \(gave up after 2 attempts\)"):
        download.fetch(file_server.url("/set.tar.gz"), tmp_path / "f", retries=1, backoff_s=0.01, timeout_s=0.3)
    assert list(tmp_path.iterdir()) == []


def test_manifest_can_skip_a_failing_image_and_lists_it(file_server, tmp_path):
    lines = []
    for name, data in DATASET.items():
        file_server.files[f"/img/{name}"] = data
        lines.append(f"img/{name},{name.split('/')[0]}")
    lines.append("img/dog/gone.png,dog")
    file_server.files["/list.csv"] = "\n".join(lines).encode()

    summary = download.download_dataset(file_server.url("/list.csv"), tmp_path / "raw", "download.json",
                                        backoff_s=0.01, skip_failed_images=True)

    assert summary["images_per_class"] == {"cat": 2, "dog": 1}
    [failed] = summary["failed"]
    assert failed["url"] == file_server.url("/img/dog/gone.png") and "HTTP 404" in failed["error"]
    assert json.loads((tmp_path / "raw" / "download.json").read_text())["failed"] == summary["failed"]


def tar_with(name: str, kind: bytes, linkname: str = "", size: int = 0) -> bytes:
    """The dataset plus one member of `kind`; a regular one holds `size` zero bytes."""
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, linkname, size
    return tar_bytes(DATASET, (info,))


def zip_with(name: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zipped:
        for member, content in DATASET.items():
            zipped.writestr(member, content)
        zipped.writestr(name, data)
    return buffer.getvalue()


ZEROS = bytes(4 << 20)
HOSTILE = {
    "absolute path": (lambda: tar_with("/tmp/absolute.png", tarfile.REGTYPE, size=3), "'/tmp/absolute.png'"),
    "symlink outside": (lambda: tar_with("cat/link.png", tarfile.SYMTYPE, "../../../etc/passwd"), "'cat/link.png'"),
    "symlink inside": (lambda: tar_with("cat/same.png", tarfile.SYMTYPE, "a.png"), "'cat/same.png'"),
    "hard link outside": (lambda: tar_with("cat/hard.png", tarfile.LNKTYPE, "/etc/passwd"), "'cat/hard.png'"),
    "character device": (lambda: tar_with("cat/null", tarfile.CHRTYPE), "'cat/null'"),
    "fifo": (lambda: tar_with("cat/pipe", tarfile.FIFOTYPE), "'cat/pipe'"),
    "tar bomb": (lambda: tar_with("dog/zeros.png", tarfile.REGTYPE, size=len(ZEROS)),
                 r"'dog/zeros.png' takes the extracted size to \d+ bytes, more than 100 times"),
    "zip bomb": (lambda: zip_with("dog/zeros.png", ZEROS),
                 r"'dog/zeros.png' takes the extracted size to \d+ bytes, more than 100 times"),
    "zip parent path": (lambda: zip_with("../escaped.png", b"x"), r"'\.\./escaped\.png'"),
    "zip absolute path": (lambda: zip_with("/tmp/zipabs.png", b"x"), "'/tmp/zipabs.png'"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_archive_is_refused_naming_the_member_and_writes_nothing_outside(case, tmp_path):
    make, member = HOSTILE[case]
    suffix = ".zip" if case.startswith("zip") else ".tar.gz"
    source = tmp_path / "source" / f"hostile{suffix}"
    source.parent.mkdir()
    source.write_bytes(make())
    out = tmp_path / "out"
    with pytest.raises(UnsafeArchiveError, match=member):
        download.download_dataset(source.as_uri(), out / "raw", "download.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "source"]
    assert list(out.iterdir()) == [], "the work folder is removed"
    assert not Path("/tmp/absolute.png").exists() and not Path("/tmp/zipabs.png").exists()


def test_extracted_size_cap_names_the_member_that_passes_it(tmp_path):
    archive = tmp_path / "set.tar.gz"
    archive.write_bytes(tar_bytes(DATASET))
    # Each member costs its bytes plus MEMBER_OVERHEAD_BYTES: the third passes three overheads.
    cap = 3 * download.MEMBER_OVERHEAD_BYTES
    with pytest.raises(UnsafeArchiveError, match=r"member 'dog/c.png' takes the extracted size to \d+ bytes, "
                                                 f"more than {cap} bytes"):
        download.extract_archive(archive, tmp_path / "out", max_bytes=cap)


def test_an_archive_of_50000_empty_folders_is_a_bomb(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for index in range(50_000):
            info = tarfile.TarInfo(f"cat/{index:05d}")
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
    archive = tmp_path / "folders.tar.gz"
    archive.write_bytes(buffer.getvalue())
    assert archive.stat().st_size < 300_000

    with pytest.raises(UnsafeArchiveError, match=r"member 'cat/\d+' takes the extracted size to \d+ bytes, more than "
                                                 r"100 times the archive's"):
        download.extract_archive(archive, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_the_embedded_archive_fits_the_bomb_budget(tmp_path):
    download.extract_archive(EMBEDDED_ARCHIVE, tmp_path / "out")
    assert len(list((tmp_path / "out").rglob("*.png"))) == 5000


@pytest.mark.parametrize("url, shown", [
    ("http://reader:PASSWORDSECRET42@host:8/d.tar.gz?X-Amz-Signature=SECRETSIG#sha256=00",
     "http://***@host:8/d.tar.gz#sha256=00"),
    ("https://ghp_SECRETTOKEN@github.com/x.tgz", "https://***@github.com/x.tgz"),
    ("https://host/d.tar.gz?versionId=7&X-Amz-Signature=SECRETSIG", "https://host/d.tar.gz?redacted-sha256={}"),
    ("file:data/mnist_5k.tar.gz", "file:data/mnist_5k.tar.gz"),
])
def test_redact_url_hides_the_user_information_and_the_signature(url, shown):
    assert download.redact_url(url) == shown.format(hashlib.sha256(b"versionId=7").hexdigest()[:16])


def presigned(signature: str, date: str) -> dict[str, str]:
    """One object's URL as AWS (SigV4 and SigV2), Google and Azure sign it, on `date`."""
    return {
        "aws": f"https://b.s3.amazonaws.com/d.tgz?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F{date}"
               f"&X-Amz-Date={date}T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host"
               f"&X-Amz-Security-Token=TOKEN{signature}&X-Amz-Signature={signature}",
        "aws-v2": f"https://b.s3.amazonaws.com/d.tgz?AWSAccessKeyId=AKIA&Expires={date}&Signature={signature}",
        "google": f"https://storage.googleapis.com/b/d.tgz?X-Goog-Algorithm=GOOG4-RSA-SHA256"
                  f"&X-Goog-Credential=sa%2F{date}&X-Goog-Date={date}T000000Z&X-Goog-Expires=900"
                  f"&X-Goog-SignedHeaders=host&X-Goog-Signature={signature}",
        "azure": f"https://a.blob.core.windows.net/c/d.tgz?sv=2022-11-02&st={date}&se={date}&sr=b&sp=r&spr=https"
                 f"&skoid=OID&sig={signature}",
    }


@pytest.mark.parametrize("cloud", ["aws", "aws-v2", "google", "azure"])
def test_a_re_signed_url_of_one_object_redacts_to_one_string_without_the_signature(cloud):
    first, again = presigned("SECRETSIG", "20260101")[cloud], presigned("OTHERSIG", "20260202")[cloud]
    assert download.redact_url(first) == download.redact_url(again) == first.partition("?")[0]
    other_object = f"{first}&versionId=2"
    assert download.redact_url(other_object) != download.redact_url(first)
    assert download.redact_url(other_object) != download.redact_url(f"{first}&versionId=3")
    assert "SECRETSIG" not in download.redact_url(other_object)


def test_parameters_named_like_a_signature_count_where_no_signature_is():
    # `se` and `Expires` sign an Azure or AWS URL only beside `sig` or `AWSAccessKeyId`;
    # elsewhere they may choose what is served, so they still tell two URLs apart.
    assert download.redact_url("https://h/d.tgz?se=1") != download.redact_url("https://h/d.tgz?se=2")
    assert download.redact_url("https://h/d.tgz?Expires=1") != download.redact_url("https://h/d.tgz?Expires=2")


def serve_images(file_server, count: int = 2) -> list[str]:
    for index in range(count):
        file_server.files[f"/img/{index}.png"] = png(10 * index)
    return [file_server.url(f"/img/{index}.png") for index in range(count)]


def test_a_public_manifest_may_not_name_loopback_images_unless_allowed(file_server, tmp_path):
    [cat, dog] = serve_images(file_server)
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"{cat},cat\n{dog},dog\n")
    public = "http://93.184.215.14/m.csv"  # a literal public address: its check needs no DNS

    with pytest.raises(RefusedURL, match=r"m.csv: line 1: .*/img/0.png: host '127.0.0.1' is 127.0.0.1, a private or "
                                         r"loopback address, named from a public one"):
        download.fetch_manifest(manifest, public, tmp_path / "out", workers=1, retries=0, backoff_s=0.01)
    assert sum(file_server.requests.values()) == 0, "refused before any connection"

    download.fetch_manifest(manifest, public, tmp_path / "out", workers=1, retries=0, backoff_s=0.01,
                            allow_private_addresses=True)
    assert sorted(p.name for p in (tmp_path / "out").rglob("*.png")) == ["0.png", "1.png"]


# 169.254.169.254 wrapped in IPv6: NAT64 (well-known and local-use), 6to4, IPv4-compatible, and a
# Teredo address whose client (stored inverted) is it; `ipaddress` calls the first four global.
EMBEDDED_METADATA = ["[64:ff9b::a9fe:a9fe]", "[64:ff9b:1::a9fe:a9fe]", "[2002:a9fe:a9fe::1]", "[::a9fe:a9fe]",
                     "[2001:0:4136:e378:8000:63bf:5601:5601]"]


@pytest.mark.parametrize("host", ["169.254.169.254", "[fe80::1]", "100.100.100.200", "[::ffff:169.254.169.254]",
                                  "metadata.google.internal", *EMBEDDED_METADATA])
def test_metadata_and_link_local_addresses_are_refused_even_when_private_ones_are_allowed(host, tmp_path):
    guard = download.FetchGuard(private_ok=True)
    with pytest.raises(RefusedURL, match="never fetched"):
        download.fetch(f"http://{host}/latest/meta-data/x.png", tmp_path / "x.png", retries=0, guard=guard)
    assert list(tmp_path.iterdir()) == []


def test_a_redirect_to_a_metadata_address_is_refused(file_server, tmp_path):
    class Redirecting(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirecting) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            with pytest.raises(RefusedURL, match=r"/a.png: host '169.254.169.254' is 169.254.169.254, a link-local"):
                download.fetch(f"http://127.0.0.1:{server.server_address[1]}/a.png", tmp_path / "a.png", retries=0)
        finally:
            server.shutdown()
    assert list(tmp_path.iterdir()) == []


def test_user_and_password_in_a_url_are_sent_as_basic_authentication(file_server, tmp_path):
    file_server.files["/a.png"] = png(1)
    url = file_server.url("/a.png").replace("http://", "http://reader:PASSWORDSECRET42@")
    download.fetch(url, tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes() == png(1)
    assert file_server.authorizations["/a.png"] == ["Basic " + base64.b64encode(b"reader:PASSWORDSECRET42").decode()]


def test_an_image_over_its_cap_fails_naming_the_line_and_the_cap(file_server, tmp_path):
    [small, _] = serve_images(file_server)
    file_server.files["/img/big.png"] = bytes(5000)
    file_server.files["/m.csv"] = f"{small},cat\nimg/big.png,dog\n".encode()
    with pytest.raises(SizeCapExceeded, match=r"m.csv: line 2: .*/img/big.png: more than 4000 bytes, its cap "
                                              r"\(its Content-Length says 5000\)"):
        download.download_dataset(file_server.url("/m.csv"), tmp_path / "raw", "download.json", max_image_bytes=4000,
                                  skip_failed_images=True)
    assert list(tmp_path.iterdir()) == []


def test_colliding_file_names_in_one_class_are_kept_apart(file_server, tmp_path):
    file_server.files["/x/a.png"], file_server.files["/y/a.png"] = png(1), png(2)
    file_server.files["/z/b.png"] = png(3)
    file_server.files["/m.csv"] = b"x/a.png,cat\ny/a.png,cat\nz/b.png,dog\n"
    download.download_dataset(file_server.url("/m.csv"), tmp_path / "raw", "download.json")
    suffix = hashlib.sha256(file_server.url("/y/a.png").encode()).hexdigest()[:8]
    cat = tmp_path / "raw" / "cat"
    assert sorted(p.name for p in cat.iterdir()) == [f"a-{suffix}.png", "a.png"]
    assert (cat / "a.png").read_bytes() == png(1) and (cat / f"a-{suffix}.png").read_bytes() == png(2)


def test_the_same_image_twice_in_one_class_fails_naming_both_lines(file_server, tmp_path):
    file_server.files["/m.csv"] = b"url,label\nx/a.png,cat\nx/b.png,dog\nx/a.png,cat\n"
    with pytest.raises(DatasetError, match=r"m.csv: lines 2 and 4 both put .*/x/a.png in class 'cat'"):
        download.download_dataset(file_server.url("/m.csv"), tmp_path / "raw", "download.json")


@pytest.mark.parametrize("address, private", [("64:ff9b::7f00:1", True), ("2002:7f00:1::1", True), ("::7f00:1", True),
                                              ("::ffff:127.0.0.1", True), ("::1", True), ("64:ff9b::808:808", False),
                                              ("2002:808:808::1", False), ("::ffff:8.8.8.8", False),
                                              ("2606:4700::1111", False), ("93.184.215.14", False)])
def test_an_ipv6_address_is_judged_by_the_ipv4_address_it_embeds(address, private):
    why = download._refused_address(ipaddress.ip_address(address), private_ok=False)
    assert (why is not None and "private or loopback" in why) == private, why


def test_a_manifest_is_local_by_the_address_it_came_from_not_by_its_host_name():
    # A DNS server may answer a public address for the fetch and 127.0.0.1 for a second look:
    # only the address the body came from counts.
    assert not download.private_origin("http://localhost/m.csv", "93.184.215.14")
    assert not download.private_origin("http://localhost/m.csv", None)
    assert download.private_origin("http://example.org/m.csv", "127.0.0.1")
    assert download.private_origin("http://example.org/m.csv", "64:ff9b::a00:1")  # NAT64 of 10.0.0.1
    assert download.private_origin("file:sets/m.csv", None)


def test_a_manifest_fetched_from_a_public_address_may_not_name_loopback_images_whatever_its_host(file_server,
                                                                                                  tmp_path):
    [cat, dog] = serve_images(file_server)
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"{cat},cat\n{dog},dog\n")
    rebound = file_server.url("/m.csv").replace("127.0.0.1", "localhost")
    with pytest.raises(RefusedURL, match="a private or loopback address, named from a public one"):
        download.fetch_manifest(manifest, rebound, tmp_path / "out", workers=1, retries=0, backoff_s=0.01,
                                origin_address="93.184.215.14")
    assert sum(file_server.requests.values()) == 0


def test_the_guard_records_the_address_the_body_came_from_after_a_redirect(file_server, tmp_path):
    file_server.files["/m.csv"] = b"x"

    class RedirectingToIPv6(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            self.send_response(302)
            self.send_header("Location", f"http://[::1]:{ipv6.server_address[1]}/m.csv")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    class Serving(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            self.send_response(200)
            self.send_header("Content-Length", "1")
            self.end_headers()
            self.wfile.write(b"x")

        def log_message(self, *args):
            pass

    class IPv6Server(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET6

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), RedirectingToIPv6) as ipv4, \
            IPv6Server(("::1", 0), Serving) as ipv6:
        for server in (ipv4, ipv6):
            threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            guard = download.FetchGuard()
            download.fetch(f"http://127.0.0.1:{ipv4.server_address[1]}/m.csv", tmp_path / "m.csv", guard=guard)
            assert guard.peer() == "::1"
            download.fetch(file_server.url("/m.csv"), tmp_path / "again.csv", guard=guard)
            assert guard.peer() == "127.0.0.1"
        finally:
            ipv4.shutdown()
            ipv6.shutdown()


def test_a_manifest_image_with_a_hidden_file_name_is_refused_naming_its_line(file_server, tmp_path):
    file_server.files["/m.csv"] = b"img/0.png,cat\nimg/.stage.json,cat\nimg/1.png,dog\n"
    with pytest.raises(DatasetError, match=r"m.csv: line 2 names .*/img/.stage.json, whose file name '.stage.json' "
                                           r"is hidden"):
        download.download_dataset(file_server.url("/m.csv"), tmp_path / "raw", "download.json")
    assert file_server.requests["/img/0.png"] == 0
