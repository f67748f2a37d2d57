"""What a user brings and gets back: file permissions, progress in logs."""

import io
import os
import stat
import time

import pytest

from latentdist._io import atomic_open, save_json, save_text
from latentdist._progress import LogBar, progress_bar


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_writes_get_the_mode_open_would_give(tmp_path, umask022):
    save_json(tmp_path / "a.json", {"x": 1})
    save_text(tmp_path / "b.md", "hi")
    with open(tmp_path / "plain.txt", "w") as f:  # what an ordinary open() gives
        f.write("x")
    assert _mode(tmp_path / "a.json") == _mode(tmp_path / "b.md") == 0o644
    assert _mode(tmp_path / "plain.txt") == 0o644
    os.umask(0o077)
    save_json(tmp_path / "a.json", {"x": 2})  # replaced, with the new umask's mode
    assert _mode(tmp_path / "a.json") == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_atomic_write_interrupted_leaves_the_old_file(tmp_path):
    save_text(tmp_path / "r.md", "old")
    with pytest.raises(RuntimeError), atomic_open(tmp_path / "r.md") as f:
        f.write("half")
        raise RuntimeError
    assert (tmp_path / "r.md").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.md"]


class _Log(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_progress_to_a_log_is_a_few_plain_lines():
    log = _Log()
    bar = progress_bar(range(5000), file=log, desc="fit", leave=True)
    assert isinstance(bar, LogBar)
    bar._interval = 0.05  # a line every 50 ms at most (10 s by default)
    t0 = time.monotonic()
    for _ in bar:
        bar.set_postfix(loss="1.0")  # refreshes on every call, like the fitting loops
        time.sleep(1e-5)
    elapsed = time.monotonic() - t0
    text = log.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and "\x1b" not in text
    assert 1 <= len(lines) <= elapsed / 0.05 + 2  # throttled, plus the closing line
    assert "5000/5000" in lines[-1]


def test_progress_off_and_transient_bars_write_nothing():
    log = _Log()
    for _ in progress_bar(range(100), file=log, disable=True):
        pass
    for _ in progress_bar(range(100), file=log, leave=False):  # short and transient
        pass
    assert log.getvalue() == ""
