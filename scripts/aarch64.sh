#!/usr/bin/env bash
# Run tests of the C++ kernels as built for aarch64 (the baseline level: NEON through the
# compiler, 4 lanes, 32 registers) on an x86-64 Debian machine, under qemu-user:
#
#   scripts/aarch64.sh [pytest arguments]     (default: the C++ parity tests, -k cpu)
#
# What it sets up, once, in $FASTCOMPRESS_AARCH64_DIR (default ~/.cache/fastcompress-aarch64):
#   - Debian's aarch64 cross compiler and qemu-user (apt, needs root), and qemu registered
#     with binfmt_misc so that aarch64 programs (Python, and the subprocesses the tests
#     start) run transparently;
#   - Debian bookworm's arm64 CPython 3.11, unpacked into a sysroot (not installed);
#   - PyPI's torch 2.9.1 aarch64 wheel (the newest CPU-only aarch64 build there, ~100 MB;
#     newer aarch64 wheels are CUDA builds), unpacked beside it, plus the pure-Python test
#     dependencies. Nothing is installed into any Python environment of the host.
# The extension is then built just in time by the emulated Python with the cross compiler
# (CXX=aarch64-linux-gnu-g++), in its own cache folder, and the tests run from a package
# tree of symlinks into this checkout. Emulation is ~20x slower than native: torch alone
# takes ~40 s to import.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
dir="${FASTCOMPRESS_AARCH64_DIR:-$HOME/.cache/fastcompress-aarch64}"
torch_version=2.9.1
mkdir -p "$dir"

if [ "$(uname -m)" != "x86_64" ]; then
  echo "scripts/aarch64.sh emulates aarch64 on x86-64; on an aarch64 machine run pytest itself" >&2
  exit 2
fi
sudo_="" && [ "$(id -u)" != 0 ] && sudo_="sudo"

if ! command -v aarch64-linux-gnu-g++ >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
  echo "== apt: g++-aarch64-linux-gnu qemu-user"
  apt_install() {
    $sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -q g++-aarch64-linux-gnu qemu-user >/dev/null
  }
  apt_install || { $sudo_ apt-get update -q >/dev/null && apt_install; }
fi

if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  $sudo_ mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  $sudo_ sh -c "cat /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register"
fi

root="$dir/root"
if [ ! -x "$root/usr/bin/python3.11" ]; then
  echo "== Debian arm64 CPython 3.11 into $root"
  dpkg --print-foreign-architectures | grep -qx arm64 || {
    $sudo_ dpkg --add-architecture arm64
    $sudo_ apt-get update -q >/dev/null
  }
  mkdir -p "$dir/debs" && (cd "$dir/debs" && apt-get download -q \
    python3.11-minimal:arm64 libpython3.11-minimal:arm64 libpython3.11-stdlib:arm64 \
    libc6:arm64 libexpat1:arm64 zlib1g:arm64 libssl3:arm64 libffi8:arm64 libbz2-1.0:arm64 \
    liblzma5:arm64 libsqlite3-0:arm64 libstdc++6:arm64 libgcc-s1:arm64 libgomp1:arm64 \
    libncursesw6:arm64 libtinfo6:arm64 libreadline8:arm64 libuuid1:arm64 libcrypt1:arm64 \
    libnsl2:arm64 libtirpc3:arm64 libdb5.3:arm64 >/dev/null 2>&1)
  for deb in "$dir"/debs/*.deb; do dpkg -x "$deb" "$root"; done
fi

host_pip=(python3 -m pip)
if [ ! -d "$dir/site/torch" ]; then
  echo "== torch $torch_version (aarch64, CPU) from PyPI into $dir/site"
  "${host_pip[@]}" download -q "torch==$torch_version" --platform manylinux_2_28_aarch64 \
    --python-version 3.11 --only-binary=:all: --no-deps -d "$dir/wheels"
  rm -rf "$dir/site.tmp" && mkdir -p "$dir/site.tmp"
  python3 -m zipfile -e "$dir"/wheels/torch-"$torch_version"-*.whl "$dir/site.tmp"
  mv "$dir/site.tmp" "$dir/site"
fi
if [ ! -d "$dir/pure/pytest" ]; then
  echo "== test dependencies (aarch64 wheels) into $dir/pure"
  "${host_pip[@]}" install -q --target "$dir/pure" --platform manylinux_2_28_aarch64 \
    --python-version 3.11 --only-binary=:all: "numpy<2.4" pytest filelock typing_extensions \
    sympy networkx jinja2 fsspec einops tqdm matplotlib "setuptools>=70.1" 2>&1 | grep -v "^WARNING" || true
  test -d "$dir/pure/pytest"
fi

# The package as an editable install would map it: fastcompress/ plus triton_kernels/.
pkg="$dir/src/fastcompress"
rm -rf "$dir/src" && mkdir -p "$pkg"
for entry in "$repo"/fastcompress/*; do ln -s "$entry" "$pkg/"; done
ln -s "$repo/triton_kernels" "$pkg/triton_kernels"
mkdir -p "$dir/bin"
ln -sf "$(command -v ninja || python3 -c 'import ninja, os; print(os.path.join(ninja.BIN_DIR, "ninja"))')" "$dir/bin/ninja"

export QEMU_LD_PREFIX="$root"
export PYTHONPATH="$dir/site:$dir/pure:$dir/src"
export PATH="$dir/bin:$PATH" CXX=aarch64-linux-gnu-g++
export FASTCOMPRESS_CACHE_DIR="$dir/cache"
python="$root/usr/bin/python3.11"
"$python" -c "import platform, torch; print('== emulated', platform.machine(), 'torch', torch.__version__)"
# -P: the working directory (the checkout, whose fastcompress/ has no triton_kernels)
# must not shadow the package tree above.
if [ $# -eq 0 ]; then
  set -- "$repo/tests" -k cpu --ignore="$repo/tests/test_triton_tiling.py" \
    --ignore="$repo/tests/test_gpu_compile.py"
fi
exec "$python" -P -m pytest -q -p no:cacheprovider -c "$repo/pytest.ini" --rootdir="$repo" "$@"
