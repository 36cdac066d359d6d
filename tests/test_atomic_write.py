"""Output files are written atomically, under unique temporary names, with ordinary permissions."""

import os
import threading

import pytest

from graphs.atomic_write import atomic_path, write_text_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    target = tmp_path / "placement.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["placement.json"]


def test_two_writers_of_one_path_never_mix_their_files(tmp_path):
    target = tmp_path / "out.json"
    texts = [str(i) * 200_000 for i in range(8)]
    threads = [threading.Thread(target=write_text_atomic, args=(target, t)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert target.read_text() in texts
    assert os.listdir(tmp_path) == ["out.json"]


def test_a_written_file_gets_the_mode_open_would_give_it(tmp_path):
    path = write_text_atomic(tmp_path / "sub" / "report.md", "x")
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
