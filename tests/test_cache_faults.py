"""Faults around the C++ build and its cache (issue 26): a build killed half-way, a
truncated library, a cache folder another user controls, a read-only cache. Each runs the
library in a child process, as a user's next process would meet the fault."""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest
from cache_entries import NAME, cache_env, loaded_library, seed

from fastcompress import _cache, _ext

pytestmark = pytest.mark.skipif(
    not _ext.load_cpu_extension(raise_on_error=False), reason="no C++ extension"
)
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

# The child: load the extension, check the cpu backend against the reference, say where
# the library came from.
CHILD = """
import torch, fastcompress as fc
from fastcompress import _ext
from fastcompress.reference import mcq_search_reference
assert _ext.load_cpu_extension(raise_on_error=False), _ext.cpu_error()
z, books = torch.randint(-3, 4, (50, 16)).float(), torch.randint(-3, 4, (2, 30, 8)).float()
got = fc.mcq_search(z, books, normalize=False, backend="cpu")
assert torch.equal(got, mcq_search_reference(z, books, False))
print("ORIGIN", _ext.cpu_origin())
"""


def _child(env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=timeout
    )


def _origin(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 0, (out.returncode, out.stdout[-1500:], out.stderr[-3000:])
    return next(line for line in out.stdout.splitlines() if line.startswith("ORIGIN")).split()[1]


@pytest.fixture
def folders(tmp_path):
    cache, fallback = tmp_path / "cache", tmp_path / "xdg"
    fallback.mkdir(mode=0o700)
    tmp_path.chmod(0o700)
    return cache, fallback


def test_a_complete_cache_entry_loads_without_building(folders):
    cache, fallback = folders
    seed(cache)
    out = _child(cache_env(cache, fallback))
    assert _origin(out).startswith(str(cache)) and "building" not in out.stderr


def test_a_truncated_library_is_rebuilt_and_a_killed_rebuild_does_not_wedge_the_next(folders):
    # A truncated copy (a full disk, a killed copy) used to SIGBUS every process on load;
    # a build killed half-way left torch's lock "baton" in the shared build folder, and
    # every later process waited on it for ever. Now: the checksum refuses the copy, the
    # rebuild runs in a private folder, and after a SIGKILL the next process builds anew.
    cache, fallback = folders
    folder = seed(cache)
    library = folder / NAME
    library.write_bytes(library.read_bytes()[: library.stat().st_size // 3])
    first = subprocess.Popen(
        [sys.executable, "-c", CHILD], env=cache_env(cache, fallback),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    said = []
    for line in first.stderr:  # the build announces itself before the compiler starts
        said.append(line)
        if "building the C++ CPU kernels" in line:
            break
    assert "does not match its checksum" in "".join(said), said
    assert "building the C++ CPU kernels" in said[-1], said
    time.sleep(3)  # the compiler is running now
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL
    leftovers = list(cache.glob(".build-cpu-*"))
    assert leftovers, "the killed build should have left its private folder"
    start = time.monotonic()
    out = _child(cache_env(cache, fallback), timeout=900)
    assert _origin(out) == str(folder), out.stderr[-2000:]
    assert "built in" in out.stderr
    assert time.monotonic() - start < 600
    assert _cache.verified_library(folder, NAME) is not None


def _tiny_library(folder: pathlib.Path, marker: pathlib.Path | None = None) -> pathlib.Path:
    """A small shared library (gcc, a fraction of a second). With ``marker``, its
    constructor creates that file when the library is loaded: a planted library."""
    source = folder / "tiny.c"
    body = "int fastcompress_tiny(void) { return 7; }\n"
    if marker is not None:
        body += textwrap.dedent(f"""
            #include <stdio.h>
            __attribute__((constructor)) static void planted(void) {{
              FILE* f = fopen("{marker}", "w"); if (f) fclose(f);
            }}
        """)
    source.write_text(body)
    output = folder / "tiny.so"
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(output), str(source)], check=True)
    return output


def _hold_lock(path: pathlib.Path) -> subprocess.Popen:
    """A child that takes the build lock and keeps it until killed."""
    code = (
        "import sys, time; from filelock import FileLock; lock = FileLock(sys.argv[1]); "
        "lock.acquire(); print('held', flush=True); time.sleep(600)"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout.readline().strip() == "held"
    return child


def test_the_lock_of_a_killed_builder_is_free_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCOMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir(mode=0o700)
    holder = _hold_lock(tmp_path / "cache" / ".tiny-k1.lock")
    holder.kill()
    holder.wait()
    tiny = _tiny_library(tmp_path)
    start = time.monotonic()
    path, built = _cache.build_once("tiny", "k1", "lib.so", lambda f: shutil.copy(tiny, f))
    assert built and time.monotonic() - start < 10
    assert _cache.verified_library(path.parent, "lib.so") == path


def test_a_live_builder_is_waited_for_at_most_the_timeout(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCOMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FASTCOMPRESS_BUILD_TIMEOUT", "1")
    (tmp_path / "cache").mkdir(mode=0o700)
    holder = _hold_lock(tmp_path / "cache" / ".tiny-k2.lock")
    try:
        tiny = _tiny_library(tmp_path)
        start = time.monotonic()
        with pytest.warns(RuntimeWarning, match="building privately"):
            path, built = _cache.build_once("tiny", "k2", "lib.so", lambda f: shutil.copy(tiny, f))
        assert built and time.monotonic() - start < 10 and path.is_file()
    finally:
        holder.kill()
        holder.wait()


def test_truncated_and_altered_libraries_are_not_verified(tmp_path):
    folder = seed(tmp_path / "cache")
    assert _cache.verified_library(folder, NAME) == folder / NAME
    data = (folder / NAME).read_bytes()
    (folder / NAME).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit: checksum
    with pytest.warns(RuntimeWarning, match="does not match its checksum"):
        assert _cache.verified_library(folder, NAME) is None
    (folder / NAME).write_bytes(data[: len(data) // 2])
    assert "truncated" in _cache.elf_truncation(folder / NAME)
    assert _cache.elf_truncation(loaded_library()) is None


@pytest.mark.parametrize("how", ["other-owner", "group-writable", "world-writable"])
def test_a_cache_folder_others_control_is_refused(folders, tmp_path, how):
    # A library planted in a shared cache would run its constructor as the user who
    # calls an op. The folder is refused (one warning), the library never loaded, and
    # the library runs from the fallback folder.
    if how == "other-owner" and not IS_ROOT:
        pytest.skip("chown to another user needs root (CI runs as root)")
    cache, fallback = folders
    marker = tmp_path / "planted-ran"
    seed(cache, _tiny_library(tmp_path, marker))
    seed(fallback / "fastcompress")
    if how == "other-owner":
        for path in (cache, *cache.rglob("*")):
            os.chown(path, 12345, 12345)
    else:
        cache.chmod(0o770 if how == "group-writable" else 0o777)
    out = _child(cache_env(cache, fallback))
    assert not marker.exists(), "the planted library was loaded"
    assert "not using the cache folder" in out.stderr
    assert _origin(out).startswith(str(fallback / "fastcompress"))


def test_a_foreign_probe_file_is_ignored(tmp_path, monkeypatch):
    from fastcompress import _probe

    monkeypatch.setenv("FASTCOMPRESS_CACHE_DIR", str(tmp_path))
    tmp_path.chmod(0o700)
    (tmp_path / "probes.json").write_text('{"GPU": {"triton/mcq": {"ok": true}}}')
    assert _probe.load_verdicts()  # ours: read
    (tmp_path / "probes.json").chmod(0o666)  # anyone could have forged the verdicts
    with pytest.warns(RuntimeWarning, match="ignoring"):
        assert _probe.load_verdicts() == {}


def test_a_read_only_cache_with_a_complete_build_is_used(folders):
    # Loading needs no lock: a read-only cache (a shared image, a read-only mount) that
    # holds a complete build is used as it is, not silently replaced by the reference.
    cache, fallback = folders
    seed(cache)
    mounted = None
    if IS_ROOT:  # root writes through permissions: a read-only bind mount
        mounted = pathlib.Path(tempfile.mkdtemp(prefix="fastcompress-ro-"))
        mounted.chmod(0o700)
        try:
            subprocess.run(["mount", "--bind", str(cache), str(mounted)], check=True)
            subprocess.run(["mount", "-o", "remount,ro,bind", str(mounted)], check=True)
        except (OSError, subprocess.CalledProcessError):
            mounted.rmdir()
            pytest.skip("cannot make a read-only bind mount here")
        read_only = mounted
    else:
        for path in (*cache.rglob("*"), cache):
            path.chmod(0o500 if path.is_dir() else 0o400)
        read_only = cache
    try:
        with pytest.raises(OSError):
            (read_only / "probe").write_text("x")
        out = _child(cache_env(read_only, fallback))
        assert _origin(out).startswith(str(read_only)), out.stderr[-2000:]
        assert "not writable" not in out.stderr and "building" not in out.stderr
    finally:
        if mounted is not None:
            subprocess.run(["umount", str(mounted)], check=False)
            mounted.rmdir()
        else:
            for path in (cache, *cache.rglob("*")):
                path.chmod(0o700)


def test_a_read_only_cache_without_a_build_builds_elsewhere(tmp_path, monkeypatch):
    tiny = _tiny_library(tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    monkeypatch.setenv("FASTCOMPRESS_CACHE_DIR", str(cache))
    monkeypatch.setattr(_cache, "_fallback", {})

    def refuse(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)
    with pytest.warns(RuntimeWarning, match="not writable"):
        path, built = _cache.build_once("tiny", "k3", "lib.so", lambda f: shutil.copy(tiny, f))
    assert built and not str(path).startswith(str(cache))
