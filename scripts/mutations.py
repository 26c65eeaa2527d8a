"""Mutation testing of the kernels: apply one plausible bug at a time, run the tests that
should catch it, restore the file. A mutation that no test catches is a blind spot.

    python scripts/mutations.py            # all mutations (about 20 minutes on 2 cores)
    python scripts/mutations.py pool-store # the ones whose id contains the word

The list grows with every review (issue 26 added the last ones); the results of the
latest run are in benchmarks/NOTES.md ("Mutation testing").
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Mutation:
    id: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()  # extra environment for the test run


# The C++ tests at the avx512 level on any CPU with AVX2 (see .ci/run).
AVX512_LEVEL = (("FASTCOMPRESS_EMULATE_AVX512", "1"), ("FASTCOMPRESS_TEST_CPU_ISAS", "avx512"))

MUTATIONS = [
    # Issue 12: a bug only the 32-register blocking reaches (8 row vectors at D = 2: the
    # avx512 level and NEON); the avx2 and baseline runs pass with it (checked).
    Mutation(
        "wide-block-loads-wrong-row-vector",
        "csrc/cpu/mcq_kernels.inc",
        "z[v][j] = loadv(chunks_t + j * RV * kLanes + v * kLanes);",
        "z[v][j] = loadv(chunks_t + j * RV * kLanes + (v % 4) * kLanes);",
        ("tests/test_mcq_ops.py", "tests/test_review_blind_spots.py"),
        AVX512_LEVEL,
    ),
    Mutation(
        "dispatch-assumes-avx2",
        "csrc/cpu/ops.cpp",
        '__builtin_cpu_supports("fma")) return kLevelWithAvx2;',
        '__builtin_cpu_supports("fma") || true) return kLevelWithAvx2;',
        ("tests/test_cpu_isa.py::test_the_library_runs_on_an_x86_64_cpu_without_avx",),
    ),
    # Issue 14 (drop-in fidelity) and the v2 kernels of this session.
    Mutation(
        "voco-text-sees-prefix-by-default",
        "fastcompress/voco.py",
        "            full = ((0, p), (h, v)) if self.text_sees_prefix else ((h, v),)",
        "            full = ((0, p), (h, v))",
        ("tests/test_voco.py",),
    ),
    Mutation(
        "autocast-entropy-in-bf16",
        "fastcompress/entropy.py",
        "@without_autocast\ndef _backward(",
        "def _backward(",
        ("tests/test_autocast.py",),
    ),
    Mutation(
        "mgvq-reseed-off-the-random-stream",
        "fastcompress/nn/grouped.py",
        "        mask_draw = float(torch.rand(1))",
        "        mask_draw = 0.5",
        ("tests/test_grouped_quantizer.py",),
    ),
    Mutation(
        "extractor-ignores-add-zero-attn",
        "fastcompress/nn/compress.py",
        '        if attn.add_zero_attn:\n            return "add_zero_attn"',
        '        if False:\n            return "add_zero_attn"',
        ("tests/test_extractor_fidelity.py",),
    ),
    Mutation(
        "compress-backward-drops-pooled-grad",
        "fastcompress/compress.py",
        "stride, grid_w // stride, stride, dim).add_(",
        "stride, grid_w // stride, stride, dim).mul_(",
        ("tests/test_compress.py",),
    ),
    Mutation(
        "mcq-interleaved-block-skips-a-code",
        "csrc/cpu/mcq_kernels.inc",
        "for (; k + NC <= k_end; k += NC)",
        "for (k += NC; k + NC <= k_end; k += NC)",
        ("tests/test_mcq_ops.py",),
    ),
    Mutation(
        "pool-store-ignores-d-chunk",
        "triton_kernels/compress.py",
        "pooled_b + prow[:, None] * dim + offs_d[None, :],",
        "pooled_b + prow[:, None] * dim + tl.arange(0, BLOCK_D)[None, :],",
        ("tests/test_triton_tiling.py",),
    ),
    Mutation(
        "voco-out-keeps-q-strides",
        "fastcompress/voco.py",
        "    out = q.new_empty(q.shape)\n    if layout.n_hybrid",
        "    out = torch.empty_like(q)\n    if layout.n_hybrid",
        ("tests/test_review_bugs.py",),
    ),
    Mutation(
        "decode-i32-key-offsets",
        "triton_kernels/decode_attention.py",
        "keys[:, None].to(tl.int64) * k_stride_s",
        "keys[:, None] * k_stride_s",
        ("tests/test_review_bugs.py",),
    ),
    Mutation(
        "voco-i32-key-offsets",
        "triton_kernels/voco.py",
        "offs = keys[:, None].to(tl.int64) * stride_l",
        "offs = keys[:, None] * stride_l",
        ("tests/test_review_bugs.py",),
    ),
    Mutation(
        "cpu-decode-lse-of-blind-rows",
        "fastcompress/decode.py",
        '        lse = lse.masked_fill(no_key[..., 0], float("-inf"))',
        "        pass",
        ("tests/test_review_bugs.py",),
    ),
    Mutation(
        "cpu-block-search-ties-to-last-block",
        "csrc/cpu/mcq_kernels.inc",
        "const vint better = block_max[v] > best[v];",
        "const vint better = block_max[v] >= best[v];",
        ("tests/test_mcq_ops.py",),
    ),
    Mutation(
        "cpu-rescan-skips-first-code",
        "csrc/cpu/mcq_kernels.inc",
        "scan_codes(chunk, book, bias, D, static_cast<int32_t>(k0),",
        "scan_codes(chunk, book, bias, D, static_cast<int32_t>(k0 + 1),",
        ("tests/test_review_blind_spots.py",),
    ),
    Mutation(
        "triton-search-ties-to-last",
        "triton_kernels/mcq.py",
        "better = tile_best > best",
        "better = tile_best >= best",
        ("tests/test_mcq_ops.py",),
    ),
    Mutation(
        "deterministic-grads-drop-segment",
        "triton_kernels/mcq.py",
        "return (prefix[edges[1:]] - prefix[edges[:-1]]).to(values.dtype)",
        "return (prefix[edges[1:]] - prefix[edges[1:]]).to(values.dtype)",
        ("tests/test_review_blind_spots.py",),
    ),
    Mutation(
        "cuda-composition-counts-one-group",
        "fastcompress/mcq.py",
        "torch.bincount(idx[:, g], minlength=vocab) for g in range(groups)",
        "torch.bincount(idx[:, 0], minlength=vocab) for g in range(groups)",
        ("tests/test_review_blind_spots.py",),
    ),
    Mutation(
        "decode-merge-ignores-lse",
        "fastcompress/decode.py",
        "weight = torch.exp(lse - safe.unsqueeze(1)).nan_to_num(0.0)",
        "weight = torch.ones_like(lse) / lse.shape[1]",
        ("tests/test_decode.py",),
    ),
]


# Issue 26 (trust): each defect it found, put back, must fail a test again.
MUTATIONS += [
    Mutation(
        "odd-block-tail-drops-last-code",
        "csrc/cpu/mcq_kernels.inc",
        "for (; k < k_end; ++k) fold_codes<D, RV, 1, kBias>",
        "for (; k + 1 < k_end; ++k) fold_codes<D, RV, 1, kBias>",
        ("tests/test_mcq_ops.py",),
    ),
    Mutation(
        "isa-fixture-runs-the-best-level",
        "tests/conftest.py",
        "        with _ext.forced_cpu_isa(level):",
        "        with _ext.forced_cpu_isa(_ext.cpu_isa()):",
        ("tests/test_mcq_ops.py",),
    ),
    Mutation(
        "decode-cpu-reads-strided-q",
        "fastcompress/decode.py",
        "    queries = queries.to(dtype).contiguous()",
        "    queries = queries.to(dtype)",
        ("tests/test_trust.py",),
    ),
    Mutation(
        "decode-empty-query-reaches-the-kernel",
        "fastcompress/decode.py",
        "    if q.numel() == 0:  # no query",
        "    if False:  # no query",
        ("tests/test_trust.py",),
    ),
    Mutation(
        "cache-loads-without-checksum",
        "fastcompress/_cache.py",
        "    if sha256(library) != want or elf_truncation(library):",
        "    if False:",
        ("tests/test_cache_faults.py::test_truncated_and_altered_libraries_are_not_verified",),
    ),
    Mutation(
        "cache-trusts-any-owner",
        "fastcompress/_cache.py",
        '    if not hasattr(os, "getuid"):  # no POSIX ownership',
        "    if True:  # no POSIX ownership",
        ("tests/test_cache_faults.py::test_a_cache_folder_others_control_is_refused",),
    ),
    Mutation(
        "cache-needs-a-lock-to-load",
        "fastcompress/_cache.py",
        '    final = root() / f"{kind}-{key}"\n    if verified_library(final, name):\n'
        "        return final / name, False\n",
        '    final = root() / f"{kind}-{key}"\n',
        ("tests/test_cache_faults.py::test_a_read_only_cache_with_a_complete_build_is_used",),
    ),
    Mutation(
        "compress-blames-x-for-queries",
        "fastcompress/compress.py",
        "        for name, value in small:",
        "        for name, value in ():",
        ("tests/test_trust.py",),
    ),
    Mutation(
        "nan-beta-accepted",  # the op's own check (mcq_quantize checks beta first as well)
        "fastcompress/mcq.py",
        '    check_finite_number("beta", beta)\n    name = select_backend',
        "    name = select_backend",
        ("tests/test_trust.py",),
    ),
    Mutation(
        "failed-probe-not-recorded",
        "fastcompress/_probe.py",
        "            _save(key, backend, family, stored)",
        '            if stored["ok"]:\n                _save(key, backend, family, stored)',
        ("tests/test_probe_and_selftest.py",),
    ),
    Mutation(
        "checkpoint-shapes-unchecked",
        "fastcompress/pipeline.py",
        "        if tuple(state[key].shape) != shape:",
        "        if False:",
        ("tests/test_pipeline.py",),
    ),
    # Issue 21: the fused entropy loss.
    Mutation(
        "cpu-entropy-backward-forgets-the-row-entropy",
        "csrc/cpu/entropy_kernels.inc",
        "shift[r] = simd::hsum(mixed) + row_stats[2];",
        "shift[r] = simd::hsum(mixed);",
        ("tests/test_entropy_kernel.py",),
    ),
    Mutation(
        "triton-entropy-online-sum-not-rescaled",
        "triton_kernels/entropy.py",
        "t = alpha * (t + (top - new_top) * total)",
        "t = alpha * t",
        ("tests/test_entropy_kernel.py",),
    ),
    Mutation(
        "qemu-child-inherits-the-core-type",
        "tests/test_cpu_isa.py",
        '    env["OPENBLAS_CORETYPE"] = "Prescott"',
        "    pass",
        ("tests/test_cpu_isa.py::test_the_library_runs_on_an_x86_64_cpu_without_avx",),
        (("OPENBLAS_CORETYPE", "Haswell"),),  # as on the Zen 5 machines of this kind
    ),
]


def run(mutation: Mutation) -> str:
    path = ROOT / mutation.path
    original = path.read_text()
    if original.count(mutation.old) != 1:
        return "STALE (the original text is not in the file once: update the list)"
    path.write_text(original.replace(mutation.old, mutation.new))
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutation.tests],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={**os.environ, "TRITON_INTERPRET": "1", **dict(mutation.env)},
        )
    finally:
        path.write_text(original)
    return "caught" if out.returncode != 0 else "SURVIVED"


def main(argv: list[str]) -> int:
    chosen = [m for m in MUTATIONS if not argv or any(word in m.id for word in argv)]
    survived = 0
    for mutation in chosen:
        verdict = run(mutation)
        survived += verdict != "caught"
        print(f"{mutation.id:40s} {verdict}", flush=True)
    print(f"{len(chosen) - survived} of {len(chosen)} caught")
    return 1 if survived else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
