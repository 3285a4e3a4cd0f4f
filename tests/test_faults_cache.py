"""The decode-once image cache after crashes and damage: partial builds of dead builders are
removed (live ones kept), decoding processes die with their builder, and a damaged finished
cache is rebuilt to the same pixels, not trusted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from harness import image_cache
from harness.errors import DatasetError
from harness.image_cache import build_or_open, remove_stale_builds
from conftest import write_jpegs

REPO = Path(__file__).resolve().parent.parent


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def tmp_folder(root: Path, host: str, pid: int) -> Path:
    path = root / f"fake-r48-0123456789abcdef.tmp-{host}-{pid}-a1b2_c3"
    path.mkdir(parents=True)
    (path / "pixels.u8").write_bytes(b"\0" * 1000)
    return path


def test_stale_partial_build_is_removed_and_live_ones_kept(tmp_path):
    host = image_cache._host()
    stale = tmp_folder(tmp_path, host, dead_pid())
    live = tmp_folder(tmp_path, host, os.getpid())
    elsewhere = tmp_folder(tmp_path, "another.host", dead_pid())  # cannot tell: keep
    assert remove_stale_builds(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and elsewhere.exists()


def test_unmarked_partial_build_is_removed_only_when_old(tmp_path):
    young = tmp_path / "fake-r48-0123.tmp-abc123"
    old = tmp_path / "fake-r48-4567.tmp-def456"
    young.mkdir()
    old.mkdir()
    long_ago = time.time() - image_cache.UNMARKED_STALE_SECONDS - 60
    os.utime(old, (long_ago, long_ago))
    assert remove_stale_builds(tmp_path) == [old]
    assert young.exists()


def test_opening_the_cache_cleans_up_after_a_dead_build(tmp_path):
    records = write_jpegs(tmp_path / "imgs")
    stale = tmp_folder(tmp_path / "cache", image_cache._host(), dead_pid())
    build_or_open(records, 48, tmp_path / "cache", workers=1)
    assert not stale.exists()


SLOW_BUILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from harness import image_cache
    from conftest import write_jpegs

    real = image_cache._decode_chunk

    def slow(args):  # a decoder busy for a long time: the builder is killed meanwhile
        time.sleep(120)
        return real(args)

    image_cache._decode_chunk = slow
    image_cache.CHUNK = 1
    records = write_jpegs(Path({imgs!r}))
    image_cache.build_or_open(records, 48, Path({cache!r}), workers=2)
""")


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
def test_kill_9_of_the_builder_leaves_no_decoder_and_the_next_run_cleans_up(tmp_path):
    script = SLOW_BUILD.format(tests=str(REPO / "tests"), imgs=str(tmp_path / "imgs"),
                               cache=str(tmp_path / "cache"))
    env = {**os.environ, "HARNESS_NO_PROGRESS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env)
    try:
        deadline = time.time() + 60
        workers: list[int] = []
        while time.time() < deadline and len(workers) < 2:
            time.sleep(0.2)
            workers = children(proc.pid)
            assert proc.poll() is None, "the builder exited early"
        assert len(workers) >= 2 and list((tmp_path / "cache").glob("*.tmp-*"))
        time.sleep(0.5)  # let the decoders reach their (slow) task
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 15
        while time.time() < deadline and any(Path(f"/proc/{w}").exists() and
                                              "Z" not in _state(w) for w in workers):
            time.sleep(0.2)
        assert not [w for w in workers if Path(f"/proc/{w}").exists() and "Z" not in _state(w)]
    finally:
        if proc.poll() is None:
            proc.kill()
        for w in workers:  # should the fix regress, do not leave sleeping orphans behind
            if Path(f"/proc/{w}").exists():
                os.kill(w, signal.SIGKILL)
    assert list((tmp_path / "cache").glob("*.tmp-*"))  # the partial build the kill left
    records = write_jpegs(tmp_path / "imgs")
    build_or_open(records, 48, tmp_path / "cache", workers=1)
    assert not list((tmp_path / "cache").glob("*.tmp-*"))


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def _damage_pixels(folder: Path) -> None:
    with open(folder / "pixels.u8", "r+b") as f:
        f.truncate(os.path.getsize(folder / "pixels.u8") // 2)


def _damage_index(folder: Path) -> None:
    (folder / "index.npy").write_bytes(b"\x93NUMPY garbage")


def _damage_offsets(folder: Path) -> None:
    index = np.load(folder / "index.npy")
    index[1, 0] += 3
    np.save(folder / "index.npy", index)


def _damage_done(folder: Path) -> None:
    (folder / "done.json").write_text("{not json")


def _damage_count(folder: Path) -> None:
    done = json.loads((folder / "done.json").read_text())
    (folder / "done.json").write_text(json.dumps({**done, "images": done["images"] + 1}))


def _remove_index(folder: Path) -> None:
    (folder / "index.npy").unlink()


@pytest.mark.parametrize("damage", [_damage_pixels, _damage_index, _damage_offsets,
                                    _damage_done, _damage_count, _remove_index])
def test_damaged_cache_is_rebuilt_to_the_same_pixels(tmp_path, damage, caplog):
    records = write_jpegs(tmp_path / "imgs")
    fresh = build_or_open(records, 48, tmp_path / "cache", workers=1)
    expected = [np.array(fresh[i]) for i in range(len(records))]
    folder = Path(fresh.where)
    del fresh
    damage(folder)
    with caplog.at_level("WARNING", logger="harness.image_cache"):
        again = build_or_open(records, 48, tmp_path / "cache", workers=1)
    assert again.where == str(folder)
    for i, pixels in enumerate(expected):
        np.testing.assert_array_equal(again[i], pixels)
    assert any("damaged" in r.getMessage() and "rebuilding" in r.getMessage()
               for r in caplog.records)
    assert not list((tmp_path / "cache").glob("*.tmp-*"))


def test_whole_cache_is_opened_without_rebuilding(tmp_path, monkeypatch):
    records = write_jpegs(tmp_path / "imgs")
    build_or_open(records, 48, tmp_path / "cache", workers=1)
    monkeypatch.setattr(image_cache, "_build", lambda *a, **k: pytest.fail("rebuilt"))
    build_or_open(records, 48, tmp_path / "cache", workers=1)


# ----------------------------------------------------------------------------------- case I
def test_unreadable_image_is_named_a_permission_problem(tmp_path, monkeypatch):
    records = write_jpegs(tmp_path / "imgs")
    target = str(records.paths[2])
    real_open = open

    def guarded_open(file, *args, **kwargs):  # tests run as root: chmod 000 would not bite
        if str(file) == target:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", guarded_open)
    with pytest.raises(DatasetError) as e:
        build_or_open(records, 48, tmp_path / "cache", workers=1)
    message = str(e.value)
    assert "permission" in message.lower() and target in message
    assert "corrupt" not in message and "not an image" not in message


def test_unreadable_cache_is_named_a_permission_problem(tmp_path, monkeypatch):
    records = write_jpegs(tmp_path / "imgs")
    folder = Path(build_or_open(records, 48, tmp_path / "cache", workers=1).where)
    real_load = np.load

    def denied(file, *args, **kwargs):
        if Path(file) == folder / "index.npy":
            raise PermissionError(13, "Permission denied", str(file))
        return real_load(file, *args, **kwargs)

    monkeypatch.setattr(np, "load", denied)
    with pytest.raises(DatasetError, match="permission denied reading .*index.npy"):
        build_or_open(records, 48, tmp_path / "cache", workers=1)
    assert (folder / "done.json").exists()  # not thrown away as "damaged"
