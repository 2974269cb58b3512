"""check_writable_dir as every rank of a torchrun job runs it: on the same path at the same moment."""
import os
import threading
from pathlib import Path

import pytest

from jackpot.errors import WriteError
from jackpot.train.preflight import check_writable_dir


def test_leaves_nothing_behind(tmp_path):
    check_writable_dir(tmp_path / "a" / "run")
    assert list(tmp_path.iterdir()) == []


def test_a_directory_another_rank_made_first_is_not_an_error(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **k):
        if self == out:
            os.mkdir(out)  # the other rank wins the race between exists() and mkdir()
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    check_writable_dir(out)
    assert out.is_dir()  # the other rank's directory is left to it


def test_a_directory_another_rank_removed_while_probing_is_made_again(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_write = Path.write_text
    removed = []

    def write_text(self, *a, **k):
        if not removed:
            removed.append(True)
            os.rmdir(out)  # the other rank's check ends and removes the directory it created
        return real_write(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", write_text)
    check_writable_dir(out)
    assert removed and not out.exists()


def test_a_directory_that_keeps_vanishing_is_an_error_naming_it(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_write = Path.write_text

    def write_text(self, *a, **k):
        os.rmdir(out)
        return real_write(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(WriteError, match="--out must be a directory"):
        check_writable_dir(out)


def test_many_concurrent_checks_of_one_path_all_pass(tmp_path):
    errors = []

    def check(i):
        try:
            for _ in range(30):
                check_writable_dir(tmp_path / "x" / "run")
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=check, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
