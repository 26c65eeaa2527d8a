"""Cache entries made by hand for the tests that start a child process on a cache folder
(tests/test_cache_faults.py, tests/test_first_use.py): the format the loader expects, a
library and its SHA-256 line, written here independently of fastcompress/_cache.py."""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil

from fastcompress import _ext

NAME = "fastcompress_cpu_jit.so"


def loaded_library() -> pathlib.Path:
    origin = pathlib.Path(_ext.cpu_origin())  # the AOT library, or the JIT build's folder
    return origin if origin.is_file() else origin / NAME


def seed(cache: pathlib.Path, library: pathlib.Path | None = None) -> pathlib.Path:
    """A complete cache entry (library + checksum) for this process's build key."""
    folder = cache / f"cpu-{_ext.jit_key()}"
    folder.mkdir(parents=True, mode=0o700)
    shutil.copyfile(library or loaded_library(), folder / NAME)
    digest = hashlib.sha256((folder / NAME).read_bytes()).hexdigest()
    (folder / (NAME + ".sha256")).write_text(f"{digest}  {NAME}\n")
    for path in (cache, folder):
        path.chmod(0o700)
    return folder


def cache_env(cache: pathlib.Path, fallback: pathlib.Path) -> dict[str, str]:
    return {
        **os.environ,
        "FASTCOMPRESS_CACHE_DIR": str(cache),
        "XDG_CACHE_HOME": str(fallback),  # the fallback folder (its fastcompress/ inside)
        "FASTCOMPRESS_IGNORE_AOT": "1",  # the cache, even in CI's AOT stage
    }
