"""What a Download may read, through the real `luigi` command: a manifest names only what its
origin may, every fetch has a byte cap, the first failure stops the rest, and a URL's secrets
are shown and stored nowhere."""
from __future__ import annotations

import json
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from pipeline import download
from tests.conftest import Watched, cli_sections, run_watched, tar_bytes, write_config
from tests.test_download import png

EXIT_AFTER_FAILURE_S = 60


def run_download(folder: Path, source_url: str, *extra: str, limit_s: float = 150) -> Watched:
    config = write_config(folder / "luigi.cfg", cli_sections(folder, source_url))
    return run_watched(folder, config, "Download", "--local-scheduler", "--Download-dataset", "guarded", *extra,
                       limit_s=limit_s)


def assert_download_failed(folder: Path, result: Watched, *reasons: str) -> None:
    """Exit code 30, the failed Download named with every reason, and no file under data/raw."""
    assert result.returncode == 30, result.output[-3000:]
    assert result.after_failure is not None and result.after_failure < EXIT_AFTER_FAILURE_S, result.output[-3000:]
    [failure_line] = [line for line in result.output.splitlines() if "failed    Download(" in line]
    for reason in reasons:
        assert reason in failure_line, failure_line
    raw = folder / "data" / "raw"
    assert not raw.exists() or [path for path in raw.rglob("*") if path.is_file()] == []


def test_an_http_manifest_naming_local_files_is_refused(file_server, tmp_path):
    file_server.files["/img/0.png"] = png(1)
    file_server.files["/m.csv"] = b"url,label\nimg/0.png,a\nfile:///etc/hostname,a\nfile:///etc/passwd,b\n"
    manifest_url = file_server.url("/m.csv")

    result = run_download(tmp_path, manifest_url)

    assert_download_failed(tmp_path, result, f"{manifest_url}: line 3 names file:///etc/hostname; a manifest "
                                             "fetched over http may name http or https images only")
    assert list(tmp_path.rglob("hostname")) == [] and list(tmp_path.rglob("passwd")) == []
    assert file_server.requests["/img/0.png"] == 0, "refused before any image is fetched"


def test_a_relative_file_manifest_resolves_its_images_from_its_own_folder(tmp_path):
    images = {"cat/a.png": png(10), "dog/b.png": png(200)}
    for name, data in images.items():
        (tmp_path / "sets" / "imgs" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "sets" / "imgs" / name).write_bytes(data)
    (tmp_path / "sets" / "m.csv").write_text("imgs/cat/a.png,cat\nimgs/dog/b.png,dog\n")

    result = run_download(tmp_path, "file:sets/m.csv")

    assert result.returncode == 0, result.output[-3000:]
    [version] = (tmp_path / "data" / "raw" / "guarded").iterdir()
    assert {str(path.relative_to(version)): path.read_bytes() for path in version.rglob("*.png")} == images


def test_an_image_over_its_cap_fails_the_download_naming_its_line(file_server, tmp_path):
    file_server.files["/img/small.png"] = png(1)
    file_server.files["/img/big.png"] = bytes(3 << 20)
    file_server.files["/m.csv"] = b"img/small.png,a\nimg/big.png,b\n"

    result = run_download(tmp_path, file_server.url("/m.csv"), "--Download-max-image-bytes", "1000000",
                          "--Download-skip-failed-images")

    assert_download_failed(tmp_path, result, f"line 2: {file_server.url('/img/big.png')}: more than 1000000 bytes, "
                                             "its cap (its Content-Length says 3145728)")


def test_dev_zero_in_a_file_manifest_stops_at_the_image_cap(tmp_path):
    (tmp_path / "ok.png").write_bytes(png(1))
    (tmp_path / "m.csv").write_text("ok.png,a\nfile:///dev/zero,b\n")

    result = run_download(tmp_path, (tmp_path / "m.csv").as_uri())

    assert_download_failed(tmp_path, result, f"line 2: file:///dev/zero: more than {download.MAX_IMAGE_BYTES} bytes, "
                                             "its cap")
    assert [path for path in (tmp_path / "data").rglob("*") if path.is_file() and ".locks" not in path.parts] == []


def test_a_link_local_address_is_refused_before_any_connection(file_server, tmp_path):
    file_server.files["/img/0.png"] = png(1)
    # Allowing private addresses does not allow the metadata service: it is refused before any
    # connection is tried, so this test sends nothing off the machine.
    file_server.files["/m.csv"] = b"http://169.254.169.254/latest/meta-data/x.png,a\nimg/0.png,b\n"

    result = run_download(tmp_path, file_server.url("/m.csv"), "--Download-allow-private-addresses")

    assert_download_failed(tmp_path, result, "line 1: http://169.254.169.254/latest/meta-data/x.png: host "
                                             "'169.254.169.254' is 169.254.169.254, a link-local or cloud-metadata "
                                             "address, never fetched")


def test_the_first_failure_stops_the_other_fetches(file_server, tmp_path):
    file_server.files["/img/stalled.png"] = png(1)
    file_server.faults["/img/stalled.png"] = ["stall"] * 5
    file_server.stall_s = 120
    file_server.files["/m.csv"] = b"img/stalled.png,a\nimg/gone.png,b\n"

    result = run_download(tmp_path, file_server.url("/m.csv"), "--Download-timeout-s", "100", limit_s=200)

    assert_download_failed(tmp_path, result, f"line 2: {file_server.url('/img/gone.png')}: HTTP 404")
    # Left running, the stalled fetch would hold the run for its 100 s timeout: a generous bound.
    assert result.seconds < 80, result.output[-3000:]
    assert file_server.requests["/img/stalled.png"] == 1, "not retried once stopped"


def test_colliding_file_names_in_one_class_are_both_kept(file_server, tmp_path):
    file_server.files["/x/a.png"], file_server.files["/y/a.png"], file_server.files["/z/b.png"] = \
        png(1), png(2), png(3)
    file_server.files["/m.csv"] = b"x/a.png,cat\ny/a.png,cat\nz/b.png,dog\n"

    result = run_download(tmp_path, file_server.url("/m.csv"))

    assert result.returncode == 0, result.output[-3000:]
    [version] = (tmp_path / "data" / "raw" / "guarded").iterdir()
    assert sorted(path.read_bytes() for path in (version / "cat").iterdir()) == sorted([png(1), png(2)])
    assert json.loads((version / "download.json").read_text())["images_per_class"] == {"cat": 2, "dog": 1}


SECRETS = ("SECRETSIG", "PASSWORDSECRET42")


@pytest.mark.parametrize("scheduler", ["local", "central"])
def test_a_presigned_url_with_a_password_is_redacted_everywhere(scheduler, request, file_server, mnist_subset,
                                                                 tmp_path):
    file_server.files["/d.tar.gz?X-Amz-Signature=SECRETSIG"] = mnist_subset.read_bytes()
    url = file_server.url("/d.tar.gz?X-Amz-Signature=SECRETSIG").replace("http://", "http://reader:PASSWORDSECRET42@")
    port = request.getfixturevalue("luigid") if scheduler == "central" else None
    config = write_config(tmp_path / "luigi.cfg", cli_sections(tmp_path, url, scheduler_port=port))

    # --log-level INFO: Luigi's own lines name every task with its parameters, the URL among them.
    result = run_watched(tmp_path, config, "Convert", "--log-level", "INFO",
                         *(["--local-scheduler"] if port is None else []), limit_s=300)

    assert result.returncode == 0, result.output[-3000:]
    assert file_server.authorizations["/d.tar.gz?X-Amz-Signature=SECRETSIG"], "the credentials were sent"
    assert f"source_url={download.redact_url(url)}" in result.output
    shown = {"output": result.output}
    shown.update({str(path): path.read_bytes().decode("latin-1") for root in ("data", "results")
                  for path in (tmp_path / root).rglob("*") if path.is_file()})
    assert any("/.index/" in path for path in shown) and any(path.endswith("download.json") for path in shown)
    if port is not None:
        query = urllib.parse.quote(json.dumps({"status": "", "upstream_status": "", "search": ""}))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/task_list?data={query}", timeout=10) as response:
            shown["task_list"] = response.read().decode()
        assert "Convert" in shown["task_list"] and "Download" in shown["task_list"]
    leaks = {where: secret for where, text in shown.items() for secret in SECRETS if secret in text}
    assert leaks == {}


def test_an_archive_over_the_download_cap_fails_naming_the_cap(file_server, mnist_subset, tmp_path):
    file_server.files["/d.tar.gz"] = mnist_subset.read_bytes()
    size = len(file_server.files["/d.tar.gz"])

    result = run_download(tmp_path, file_server.url("/d.tar.gz"), "--Download-max-download-bytes", "1000")

    assert_download_failed(tmp_path, result, f"{file_server.url('/d.tar.gz')}: more than 1000 bytes, its cap "
                                             f"(its Content-Length says {size})")


def test_hidden_files_in_an_archive_are_not_published_but_listed(file_server, tmp_path):
    planted = b'{"stage": "Planted", "version": "0", "path": "elsewhere"}'
    file_server.files["/d.tar.gz"] = tar_bytes({
        "set/.stage.json": planted, "set/cat/a.png": png(1), "set/cat/.stage.json": planted,
        "set/dog/b.png": png(2), "set/__MACOSX/cat/._a.png": planted, "set/LICENSE": b"free",
    })

    result = run_download(tmp_path, file_server.url("/d.tar.gz"))

    assert result.returncode == 0, result.output[-3000:]
    [version] = (tmp_path / "data" / "raw" / "guarded").iterdir()
    published = {path.relative_to(version).as_posix(): path.read_bytes() for path in version.rglob("*")
                 if path.is_file()}
    assert planted not in published.values()
    assert sorted(published) == [".stage.json", "LICENSE", "cat/a.png", "dog/b.png", "download.json"]
    assert json.loads(published[".stage.json"])["stage"] == "Download", "the pipeline's own entry"
    summary = json.loads(published["download.json"])
    assert summary["hidden"] == ["set/.stage.json", "set/__MACOSX/", "set/cat/.stage.json"]
    assert summary["ignored"] == ["set/LICENSE"] and summary["images_per_class"] == {"cat": 1, "dog": 1}
