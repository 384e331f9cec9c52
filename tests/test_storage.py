"""The storage layer on a local folder and on a real S3 server (moto's, on 127.0.0.1): the same calls
give the same results on both."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
import uuid

import pytest

from pipeline import locks, storage
from pipeline.datafiles import visible_keys
from tests.conftest import REPO


def test_files_are_written_read_listed_and_removed_alike(root):
    assert not storage.exists(storage.join(root, "a.json")) and not storage.is_dir(root)
    before = time.time_ns()
    storage.write_json(storage.join(root, "a.json"), {"x": 1})
    storage.write_bytes(storage.join(root, "cls", "deep", "b.png"), b"png")
    storage.write_bytes(storage.join(root, "cls", ".DS_Store"), b"junk")
    storage.write_bytes(storage.join(root, ".hidden", "c.png"), b"png")

    assert storage.read_json(storage.join(root, "a.json")) == {"x": 1}
    assert storage.written_since(storage.join(root, "a.json"), before)
    assert not storage.written_since(storage.join(root, "a.json"), time.time_ns() + 5_000_000_000)
    assert visible_keys(root) == ["a.json", "cls/deep/b.png"]
    assert storage.is_dir(storage.join(root, "cls")) and not storage.is_dir(storage.join(root, "a.json"))
    assert storage.sha256_file(storage.join(root, "cls", "deep", "b.png")) == hashlib.sha256(b"png").hexdigest()
    assert storage.size_of(root) == len(storage.read_bytes(storage.join(root, "a.json"))) + 3 + 4 + 3
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(root, "missing.json"))

    storage.remove_tree(storage.join(root, "cls"))
    assert visible_keys(root) == ["a.json"] and not storage.is_dir(storage.join(root, "cls"))


def test_glob_matches_wildcards_in_any_component_and_temporaries_go(root):
    for key in ("run/model.ckpt-6_temp/part", "run/export/best/temp-123/saved_model.pb",
                "run/export/best/17/saved_model.pb", "run/metrics.json.tmp-ab12"):
        storage.write_bytes(storage.join(root, key), b"x")

    assert storage.glob(storage.join(root, "run", "export", "*", "temp-*")) == \
        [storage.join(root, "run/export/best/temp-123")]
    assert storage.glob(storage.join(root, "run", "export", "best", "[0-9]*")) == \
        [storage.join(root, "run/export/best/17")]

    storage.remove_temporaries([storage.join(root, "run", "model.ckpt-*_temp*"),
                                storage.join(root, "run", "export", "*", "temp-*"),
                                storage.join(root, "run", f"*{storage.TEMP_INFIX}*")])
    assert visible_keys(root) == ["run/export/best/17/saved_model.pb"]


def test_an_atomic_write_that_fails_leaves_the_old_content(root):
    target = storage.join(root, "leaderboard.csv")
    storage.write_bytes(target, b"old")
    with pytest.raises(RuntimeError, match="cut short"):
        with storage.atomic_path(target) as temp:
            temp.write_bytes(b"half of the new")
            raise RuntimeError("cut short")
    assert storage.read_bytes(target) == b"old"
    assert visible_keys(root) == ["leaderboard.csv"]


def test_a_published_folder_replaces_the_old_one_with_its_marker(root, tmp_path):
    folder = tmp_path / "work" / "tree"
    (folder / "cat").mkdir(parents=True)
    (folder / "cat" / "1.png").write_bytes(b"1")
    (folder / "download.json").write_text("{}")
    storage.write_bytes(storage.join(root, "v1", "stale.png"), b"old")

    storage.publish_folder(folder, storage.join(root, "v1"), "download.json")

    assert visible_keys(storage.join(root, "v1")) == ["cat/1.png", "download.json"]


def hold_lock_in_subprocess(lock: str, seconds: float) -> subprocess.Popen:
    code = (f"import time; from pipeline import locks\n"
            f"with locks.file_lock({lock!r}, guards='results/run'):\n"
            f"    print('held', flush=True); time.sleep({seconds})\n")
    process = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_lock_is_held_by_one_process_at_a_time(root):
    lock = storage.join(root, ".locks", "stage.lock")
    holder = hold_lock_in_subprocess(lock, 3)
    assert locks.held_locks(storage.join(root, ".locks")) == ["results/run"]
    start = time.monotonic()
    with locks.file_lock(lock, holder="Train(...)"):
        waited = time.monotonic() - start
    # Granted only once the holder, which held it 3 s from its "held", let go.
    assert waited > 2.0, f"the lock was granted after {waited:.1f} s while another process held it"
    assert holder.wait(timeout=30) == 0
    assert locks.held_locks(storage.join(root, ".locks")) == []


def test_a_pattern_on_a_bare_bucket_matches_from_its_root(s3_server):
    """A root may be a bucket with no folder (s3://bucket): the index's rebuild globs from it."""
    name = f"bare-{uuid.uuid4().hex[:8]}.stage.json"
    storage.write_bytes(s3_server.uri(name), b"{}")
    assert storage.glob(s3_server.uri("bare-*.stage.json")).count(s3_server.uri(name)) == 1


def test_a_lock_left_by_a_dead_process_on_s3_is_taken_over(s3_server, monkeypatch):
    lock = s3_server.uri(f"locks-{uuid.uuid4().hex[:8]}", "stage.lock")
    storage.write_bytes(lock, json.dumps({"guards": "results/run", "host": "gone", "pid": 1}).encode())
    assert locks.held_locks(storage.parent(lock)) == ["results/run"]
    # A TTL of 3 s rather than less: the new holder must renew within two thirds of it, busy or not.
    monkeypatch.setenv(locks.LOCK_TTL_VARIABLE, "3")
    time.sleep(5.1)  # S3 times objects in whole seconds: a lock is stale one second after its TTL
    assert locks.held_locks(storage.parent(lock)) == []
    with locks.file_lock(lock, guards="results/other"):
        assert json.loads(storage.read_bytes(lock))["guards"] == "results/other"
    assert not storage.exists(lock)
