"""The cache folder: where just-in-time builds and GPU probe verdicts live, and the rules
that keep a shared or damaged cache from hanging, crashing or hijacking a process.

- **Trust.** A cache folder (or a file in it) that is not owned by the current user, or
  that group or others may write, is refused with one warning, as pip and ccache do: a
  library planted there would run its constructor as whoever calls an op. The fallback
  is the user's default cache folder, else a private temporary folder.
- **Atomic builds.** A build runs in a private temporary folder inside the cache and is
  renamed into place only when complete, with a SHA-256 of the library beside it. A build
  killed half-way leaves only its private folder (torch's lock "baton" included), which
  nobody waits on.
- **Verified loads.** A library is loaded only when its checksum matches and its ELF
  section table lies inside the file (a truncated copy would SIGBUS on load). Loading
  needs no lock, so a read-only cache with a complete build works.
- **Bounded waits.** Builds of one key are serialised by an flock (released by the
  kernel when its holder dies); a waiter gives up after ``FASTCOMPRESS_BUILD_TIMEOUT``
  seconds and builds in a private folder instead.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import stat
import struct
import sys
import tempfile
import time
import warnings
from collections.abc import Callable

_CHECKSUM_SUFFIX = ".sha256"
_STALE_BUILD_SECONDS = 6 * 3600
_warned: set[str] = set()
_fallback: dict[str, pathlib.Path] = {}


def configured_root() -> pathlib.Path:
    """``FASTCOMPRESS_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastcompress`` (``~/.cache``)."""
    return pathlib.Path(os.environ.get("FASTCOMPRESS_CACHE_DIR") or default_root())


def default_root() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return pathlib.Path(base) / "fastcompress"


def unsafe_reason(path: pathlib.Path) -> str | None:
    """Why ``path`` (a folder or file that exists) must not be trusted, or None."""
    if not hasattr(os, "getuid"):  # no POSIX ownership (Windows): nothing to check
        return None
    try:
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode):
            if info.st_uid != os.getuid():
                return f"{path} is a symbolic link owned by uid {info.st_uid}"
            info = os.stat(path)
    except FileNotFoundError:
        return None
    if info.st_uid != os.getuid():
        return f"{path} is owned by uid {info.st_uid}, not by this user (uid {os.getuid()})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by group or others (mode {stat.filemode(info.st_mode)})"
    return None


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(f"fastcompress: {message}", RuntimeWarning, stacklevel=3)


def _make_private(path: pathlib.Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def root() -> pathlib.Path:
    """The cache folder to use: the configured one when it can be trusted (created 0700
    when missing), else a safe fallback (after one warning naming the reason)."""
    wanted = configured_root()
    why = unsafe_reason(wanted)
    if why is None:
        return wanted
    key = str(wanted)
    if key not in _fallback:
        _fallback[key] = _fallback_root(wanted)
        _warn_once(
            f"not using the cache folder {wanted}: {why}. A library there could run code as "
            f"you. Using {_fallback[key]} instead (set FASTCOMPRESS_CACHE_DIR to a folder "
            "only you can write)"
        )
    return _fallback[key]


def _fallback_root(refused: pathlib.Path) -> pathlib.Path:
    default = default_root()
    if default != refused and unsafe_reason(default) is None:
        return default
    return pathlib.Path(tempfile.mkdtemp(prefix="fastcompress-cache-"))


def writable_root() -> pathlib.Path:
    """:func:`root` if this process can create files there, else a private temporary
    folder (a read-only cache can still be loaded from, never built into)."""
    base = root()
    try:
        _make_private(base)
        probe = tempfile.NamedTemporaryFile(dir=base, prefix=".write-test-")
        probe.close()
        return base
    except OSError:
        key = f"read-only:{base}"
        if key not in _fallback:
            _fallback[key] = pathlib.Path(tempfile.mkdtemp(prefix="fastcompress-cache-"))
            _warn_once(
                f"the cache folder {base} is not writable: building in {_fallback[key]} "
                "(not kept after this process)"
            )
        return _fallback[key]


# --------------------------------------------------------------------- library store


def sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def elf_truncation(path: pathlib.Path) -> str | None:
    """Why ``path`` is not a whole ELF file (the section header table, which the linker
    writes last, must lie inside it), or None. Non-ELF files (macOS) are not checked."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as exc:
        return f"cannot read {path}: {exc}"
    if head[:4] != b"\x7fELF":
        return None if sys.platform == "darwin" else f"{path} is not an ELF file"
    if len(head) < 64 or head[4] != 2:  # ELFCLASS64 only
        return f"{path} has a short or non-64-bit ELF header"
    order = "<" if head[5] == 1 else ">"
    (shoff,) = struct.unpack_from(order + "Q", head, 0x28)
    shentsize, shnum = struct.unpack_from(order + "HH", head, 0x3A)
    end = shoff + shentsize * shnum
    if end > size:
        return f"{path} is truncated ({size} bytes, its section table ends at {end})"
    return None


def verified_library(folder: pathlib.Path, name: str) -> pathlib.Path | None:
    """The library ``folder/name`` when it is complete and can be trusted, else None."""
    library = folder / name
    checksum = folder / (name + _CHECKSUM_SUFFIX)
    if not library.is_file() or not checksum.is_file():
        return None
    for path in (folder, library, checksum):
        why = unsafe_reason(path)
        if why:
            _warn_once(f"not loading {library}: {why}")
            return None
    try:
        want = checksum.read_text().split()[0]
    except (OSError, IndexError):
        return None
    if sha256(library) != want or elf_truncation(library):
        _warn_once(f"{library} does not match its checksum (a truncated copy?): rebuilding")
        return None
    return library


def build_once(
    kind: str,
    key: str,
    name: str,
    build: Callable[[pathlib.Path], pathlib.Path],
    announce: Callable[[pathlib.Path], None] | None = None,
) -> tuple[pathlib.Path, bool]:
    """The verified library ``<root>/<kind>-<key>/<name>``, built by ``build(folder)`` (which
    builds and loads it, and returns its path inside ``folder``) when none is there.

    Returns the library's final path and whether this call built (and so loaded) it."""
    final = root() / f"{kind}-{key}"
    if verified_library(final, name):
        return final / name, False
    base = writable_root()
    final = base / f"{kind}-{key}"
    from filelock import FileLock, Timeout

    timeout = float(os.environ.get("FASTCOMPRESS_BUILD_TIMEOUT", "900"))
    lock = FileLock(str(base / f".{kind}-{key}.lock"), mode=0o600)
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        _warn_once(
            f"another process has held the build lock of {final} for {timeout:.0f} s "
            "(FASTCOMPRESS_BUILD_TIMEOUT): building privately"
        )
        lock = None
    try:
        if verified_library(final, name):
            return final / name, False
        _remove_stale_builds(base)
        private = pathlib.Path(tempfile.mkdtemp(prefix=f".build-{kind}-{key}-", dir=base))
        if announce:
            announce(final)
        built = pathlib.Path(build(private))
        if built.name != name:
            built.rename(private / name)
        library = private / name
        library.chmod(0o755)
        (private / (name + _CHECKSUM_SUFFIX)).write_text(f"{sha256(library)}  {name}\n")
        _replace(private, final)
        return final / name, True
    finally:
        if lock is not None:
            lock.release()


def _replace(private: pathlib.Path, final: pathlib.Path) -> None:
    """Move the finished build into place; a damaged or foreign copy there is set aside."""
    if final.exists():
        aside = final.with_name(f".old-{final.name}-{os.getpid()}-{time.monotonic_ns()}")
        try:
            final.rename(aside)
            shutil.rmtree(aside, ignore_errors=True)
        except OSError:
            shutil.rmtree(final, ignore_errors=True)
    try:
        private.rename(final)
    except OSError:  # lost a race with a private (timed-out) build: theirs stands
        if not final.exists():
            raise
        shutil.rmtree(private, ignore_errors=True)


def _remove_stale_builds(base: pathlib.Path) -> None:
    """Private build folders of killed processes, left for hours, are removed."""
    now = time.time()
    for folder in base.glob(".build-*"):
        try:
            if now - folder.stat().st_mtime > _STALE_BUILD_SECONDS:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            pass
