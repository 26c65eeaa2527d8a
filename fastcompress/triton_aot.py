"""Ahead-of-time compile of the Triton kernels for sm_80 / sm_90 without a GPU.

The interpreter is lenient (it accepts ``tl.dot`` with K < 16 and never spills), so
every shipped kernel configuration is also compiled for real and its resource usage
read back: shared memory from Triton's metadata, registers and spills from ``ptxas -v``
(the ptxas bundled with Triton). Must run in a process without TRITON_INTERPRET=1.

    python -m fastcompress.triton_aot        # prints one JSON line per configuration
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile


def _ptxas() -> str:
    import triton

    return str(pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas")


def kernel_configs():
    """(name, fn, signature, constexprs, options) for every configuration we ship."""
    from fastcompress.triton_kernels import mcq
    from fastcompress.triton_kernels.mcq import BACKWARD_CONFIG, FORWARD_CONFIG, padded_dim

    def split(config):
        blocks = {k: v for k, v in config.items() if k.isupper()}
        return blocks, {k: v for k, v in config.items() if not k.isupper()}

    fwd_blocks, fwd_opts = split(FORWARD_CONFIG)
    bwd_blocks, bwd_opts = split(BACKWARD_CONFIG)

    configs = []
    for dim in (4, 8):
        for normalize in (True, False):
            for dtype in ("fp32", "bf16"):
                sig = {
                    "z_ptr": f"*{dtype}",
                    "book_ptr": "*fp32",
                    "bias_ptr": "*fp32",
                    "idx_ptr": "*i64",
                    "zq_ptr": f"*{dtype}",
                    "counts_ptr": "*i32",
                    "err_ptr": "*fp32",
                    "n_rows": "i32",
                    "vocab": "i32",
                    "channels": "i32",
                }
                const = dict(
                    D=dim, D_PAD=padded_dim(dim), NORMALIZE=normalize, FULL=True, **fwd_blocks
                )
                configs.append(
                    (
                        f"mcq_forward d={dim} normalize={normalize} {dtype}",
                        mcq.mcq_forward_kernel,
                        sig,
                        const,
                        fwd_opts,
                    )
                )
            sig = {
                "z_ptr": "*fp32",
                "book_ptr": "*fp32",
                "idx_ptr": "*i64",
                "grad_zq_ptr": "*fp32",
                "grad_loss_ptr": "*fp32",
                "grad_z_ptr": "*fp32",
                "grad_rows_ptr": "*fp32",
                "n_rows": "i32",
                "vocab": "i32",
                "channels": "i32",
                "beta": "fp32",
                "inv_count": "fp32",
            }
            for atomic in (True, False):
                const = dict(
                    D=dim, D_PAD=padded_dim(dim), NORMALIZE=normalize, ATOMIC_ROWS=atomic,
                    **bwd_blocks,
                )  # fmt: skip
                configs.append(
                    (
                        f"mcq_backward d={dim} normalize={normalize} atomic={atomic}",
                        mcq.mcq_backward_kernel,
                        sig,
                        const,
                        bwd_opts,
                    )
                )
    from fastcompress.triton_kernels import compress
    from fastcompress.triton_kernels.compress import launch_config

    # The benchmark shapes (32 x 32 grid, 4 meta tokens x 8 heads = 32 folded queries),
    # then the corners of what the launcher accepts (compress.unsupported_reason): the
    # largest band, the most folded queries, and both at the limit of their product.
    shapes = [(32, stride, dim, 32) for dim in (64, 256, 1024) for stride in (2, 4, 0)]
    benchmark_shapes = len(shapes)
    shapes += [(16, 4, 1024, 32), (8, 2, 1024, 32), (2, 2, 1024, 32), (4, 4, 1024, 32)]
    shapes += [(32, 2, 1024, 17), (32, 4, 1024, 1)]
    for i, (grid_w, stride, dim, rows) in enumerate(shapes):
        tag = " corner" if i >= benchmark_shapes else ""
        for dtype in ("fp32", "bf16"):
            if True:
                sig = {
                    "x_ptr": f"*{dtype}",
                    "a_ptr": "*fp32",
                    "ctx_ptr": "*fp32",
                    "m_ptr": "*fp32",
                    "l_ptr": "*fp32",
                    "pooled_ptr": f"*{dtype}",
                    "tokens": "i32",
                    "dim": "i32",
                    "tiles_per_split": "i32",
                }
                const, warps = launch_config(grid_w, stride, dim, rows, dtype == "fp32")
                configs.append(
                    (
                        f"meta_context_pool W={grid_w} s={stride} M={rows} d={dim} {dtype}{tag}",
                        compress.meta_context_pool_kernel,
                        sig,
                        const,
                        dict(num_warps=warps, num_stages=2),
                    )
                )
    from fastcompress.triton_kernels import decode_attention as decode
    from fastcompress.triton_kernels.decode_attention import launch_constexprs, num_warps_for

    # ARDecompressor (dim 512, 8 heads: D = 64), an LLM-like GQA shape (32 / 8 x 128), and
    # the corners of decode_attention.unsupported_reason: 64 query rows (group x Sq) at
    # D = 64, 32 at D = 128, 16 at D = 256.
    for i, (heads, kv_heads, sq, dim) in enumerate((
        (8, 8, 1, 64), (32, 8, 1, 128), (32, 8, 16, 64), (32, 4, 4, 128), (32, 8, 4, 256),
    )):  # fmt: skip
        tag = " corner" if i >= 2 else ""
        for dtype in ("fp32", "bf16"):
            sig = {
                "q_ptr": f"*{dtype}",
                "k_ptr": f"*{dtype}",
                "v_ptr": f"*{dtype}",
                "lengths_ptr": "*i32",
                "out_ptr": "*fp32",
                "lse_ptr": "*fp32",
                "s_max": "i32",
                "chunk": "i32",
                "scale": "fp32",
            }
            sig.update({f"{t}_stride_{a}": "i32" for t in "qk" for a in "bsh"})
            configs.append(
                (
                    f"decode_attention H={heads}/{kv_heads} Sq={sq} D={dim} {dtype}{tag}",
                    decode.decode_attention_kernel,
                    sig,
                    launch_constexprs(heads, kv_heads, sq, dim, True),
                    dict(num_warps=num_warps_for(dim, heads // kv_heads * sq), num_stages=2),
                )
            )
    from fastcompress.triton_kernels import voco

    # HTC-VLM benchmark shape: 32 heads x 128 (and GQA 32 / 8).
    for heads, kv_heads in ((32, 32), (32, 8)):
        for dtype in ("fp32", "bf16"):
            sig = {
                "q_ptr": f"*{dtype}",
                "k_ptr": f"*{dtype}",
                "v_ptr": f"*{dtype}",
                "out_ptr": f"*{dtype}",
            }
            sig.update(
                {n: "i32" for n in ("row_start", "row_end", "a0", "a1", "b0", "b1", "c0", "c1")}
            )
            sig["scale"] = "fp32"
            sig.update({f"{t}_stride_{a}": "i32" for t in "qko" for a in "bhl"})
            configs.append(
                (
                    f"voco segment_attention H={heads}/{kv_heads} D=128 {dtype}",
                    voco.segment_attention_kernel,
                    sig,
                    voco.launch_constexprs(heads, kv_heads, 128),
                    dict(num_warps=voco.NUM_WARPS, num_stages=2),
                )
            )
    from fastcompress.triton_kernels import entropy

    # UniTok (d = 8) and MGVQ (d = 4) codebooks; D_PAD = 16 for both.
    for dim in (4, 8):
        stat_ptrs = {"chunks_ptr": "*fp32", "book_ptr": "*fp32", "stats_ptr": "*fp32"}
        kernels = (
            ("forward", entropy.entropy_forward_kernel, entropy.FORWARD_CONFIG,
             {"p_sums_ptr": "*fp32", "h_sums_ptr": "*fp32", "n_rows": "i32", "vocab": "i32"}),
            ("backward rows", entropy.entropy_backward_rows_kernel, entropy.BACKWARD_CONFIG,
             {"w_ptr": "*fp32", "shift_ptr": "*fp32", "mean_ptr": "*fp32",
              "grad_chunks_ptr": "*fp32", "n_rows": "i32", "vocab": "i32", "coef": "fp32"}),
            ("backward codes", entropy.entropy_backward_codes_kernel,
             entropy.BACKWARD_CODES_CONFIG,
             {"w_ptr": "*fp32", "shift_ptr": "*fp32", "gz_ptr": "*fp32", "gs_ptr": "*fp32",
              "n_rows": "i32", "vocab": "i32", "coef": "fp32"}),
        )  # fmt: skip
        for label, fn, config, rest in kernels:
            blocks, opts = split(config)
            const = dict(D=dim, D_PAD=16, **blocks)
            configs.append((f"entropy {label} d={dim}", fn, {**stat_ptrs, **rest}, const, opts))
    return configs


def compile_one(fn, signature, constexprs, options, capability: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    full_sig = dict(signature)
    for name in constexprs:
        full_sig[name] = "constexpr"
    src = triton.compiler.ASTSource(fn, full_sig, constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = pathlib.Path(tmp) / "k.ptx"
        ptx.write_text(compiled.asm["ptx"])
        # Triton targets sm_90a on Hopper; ptxas must be told the same architecture.
        arch = re.search(r"^\.target (sm_\w+)", compiled.asm["ptx"], re.M).group(1)
        out = subprocess.run(
            [_ptxas(), f"-arch={arch}", "-v", str(ptx), "-o", str(pathlib.Path(tmp) / "k.cubin")],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill_st = re.search(r"(\d+) bytes spill stores", out)
    spill_ld = re.search(r"(\d+) bytes spill loads", out)
    return {
        "registers": int(regs.group(1)) if regs else None,
        "spill_stores": int(spill_st.group(1)) if spill_st else 0,
        "spill_loads": int(spill_ld.group(1)) if spill_ld else 0,
        "shared_bytes": int(compiled.metadata.shared),
        "cubin_bytes": len(compiled.asm["cubin"]),
    }


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: an interpreted kernel cannot be compiled", file=sys.stderr)
        return 2
    for name, fn, sig, const, opts in kernel_configs():
        for cap in (80, 90):
            row = {"kernel": name, "target": f"sm_{cap}", **opts}
            row.update(compile_one(fn, sig, const, opts, cap))
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
