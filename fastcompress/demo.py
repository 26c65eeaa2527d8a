"""``fastcompress demo``: train the small UniCompress stack on synthetic grids, then
compress -> quantise -> regenerate a held-out batch on the fast and the reference path
(same run, same weights) and report token counts, errors, usage and stage times."""

from __future__ import annotations

import dataclasses
import os
import time

import torch
import torch.nn.functional as F

from fastcompress.compress import compress
from fastcompress.pipeline import (
    StackConfig,
    UniCompressStack,
    load_checkpoint,
    save_checkpoint,
    synthetic_grids,
    train,
    upsample_pooled,
)

STAGES = ("compress", "quantize", "decompress")


def run_demo(
    steps: int = 300,
    batch: int = 16,
    config: StackConfig | None = None,
    out_dir: str = "demo-results",
    seed: int = 0,
    progress: bool = True,
) -> dict:
    config = config or StackConfig()
    torch.manual_seed(seed)
    stack = UniCompressStack(config)
    start = time.perf_counter()
    losses = train(stack, steps, batch=batch, seed=seed, progress=progress)
    train_seconds = time.perf_counter() - start

    x = synthetic_grids(8, config, torch.Generator().manual_seed(seed + 10_000))  # held out
    timings = {"fastcompress": {}, "torch reference": {}}
    outputs = {}
    for path, backend in (("fastcompress", None), ("torch reference", "reference")):
        stack.set_backend(backend)
        stack.reconstruct(x[:1])  # warm-up (extension load, first-call allocations)
        outputs[path] = stack.reconstruct(x, timings[path])
    stack.set_backend(None)
    x_hat = outputs["fastcompress"]
    meta, pooled = compress(
        x, config.grid, config.stride, *stack.compressor.extractor.attention_weights()
    )
    quantized, usage = stack.quantizer.quantize(torch.cat([meta, pooled], 1))
    os.makedirs(out_dir, exist_ok=True)
    checkpoint = os.path.join(out_dir, "stack.pt")
    save_checkpoint(stack, checkpoint)
    reloaded = load_checkpoint(checkpoint)
    tokens = config.grid[0] * config.grid[1]
    report = {
        "config": dataclasses.asdict(config),
        "train_steps": steps,
        "train_seconds": train_seconds,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "tokens_dense": tokens,
        "tokens_pooled": pooled.shape[1],
        "tokens_compact": meta.shape[1] + pooled.shape[1],
        "mse_reconstruction": float(F.mse_loss(x_hat, x)),
        "mse_upsampled_continuous_pooled": float(
            F.mse_loss(upsample_pooled(pooled.detach(), config), x)
        ),
        "data_variance": float(x.var()),
        "fast_vs_reference_max_abs_diff": float((x_hat - outputs["torch reference"]).abs().max()),
        "codes_used_percent": float(usage),
        "codebook_size": config.codebook_size,
        # Distinct codes per codebook (each codebook's indices run 0..K-1 on their own).
        "codes_used_per_codebook": codes_used_per_codebook(quantized.indices),
        "timings": timings,
        "checkpoint": checkpoint,
        "checkpoint_reload_max_abs_diff": float(
            (reloaded.reconstruct(x[:2]) - stack.reconstruct(x[:2])).abs().max()
        ),
    }
    report["figure"] = _figure(report, losses, x, x_hat, os.path.join(out_dir, "demo.png"))
    return report


def codes_used_per_codebook(indices: torch.Tensor) -> list[int]:
    """Distinct codes chosen by each codebook, ``indices (..., G)`` -> G counts."""
    flat = indices.reshape(-1, indices.shape[-1])
    return [int(flat[:, g].unique().numel()) for g in range(flat.shape[1])]


def format_report(report: dict) -> str:
    t = report["timings"]
    gap = report["mse_reconstruction"] / max(report["mse_upsampled_continuous_pooled"], 1e-12)
    lines = [
        f"trained {report['train_steps']} steps in {report['train_seconds']:.1f} s: "
        f"loss {report['loss_first']:.4f} -> {report['loss_last']:.4f}",
        f"tokens: {report['tokens_dense']} dense -> {report['tokens_pooled']} pooled "
        f"({report['tokens_dense'] / report['tokens_pooled']:.0f}x) + "
        f"{report['tokens_compact'] - report['tokens_pooled']} meta = "
        f"{report['tokens_compact']} compact",
        f"reconstruction MSE from discrete indices: {report['mse_reconstruction']:.4f} "
        f"(data variance {report['data_variance']:.4f})",
        f"  yardstick {report['mse_upsampled_continuous_pooled']:.4f}: the continuous pooled "
        "tokens upsampled back to the grid, no quantisation and no decoder (what the 2x2 "
        "pooling alone keeps); the gap to it is what the codebooks' rounding and a small "
        f"decoder trained for {report['train_steps']} steps lose "
        f"({gap:.1f}x "
        "here; it narrows with more steps, a wider d and larger codebooks)",
        f"codebook usage (held-out batch): {report['codes_used_percent']:.1f}% of codes above "
        f"0.01/K; distinct codes per codebook (of K = {report['codebook_size']}): "
        f"{', '.join(map(str, report['codes_used_per_codebook']))}",
        f"fast vs reference path, same weights: max |diff| "
        f"{report['fast_vs_reference_max_abs_diff']:.2e}",
        "stage times on the held-out batch (8 grids):",
        f"  {'stage':12s} {'fastcompress':>14s} {'torch reference':>16s} {'speed-up':>9s}",
    ]
    for stage in STAGES:
        fast, ref = t["fastcompress"][stage], t["torch reference"][stage]
        lines.append(f"  {stage:12s} {fast * 1e3:11.1f} ms {ref * 1e3:13.1f} ms {ref / fast:8.1f}x")
    lines.append(
        f"checkpoint {report['checkpoint']} (reload max |diff| "
        f"{report['checkpoint_reload_max_abs_diff']:.1e})"
    )
    if report.get("figure"):
        lines.append(
            f"figure {report['figure']} (grids drawn as RGB of their 3 principal directions)"
        )
    else:
        lines.append(
            "no demo.png: matplotlib is not installed (pip install matplotlib, or "
            "'fastcompress[bench]'; `make main` installs it)"
        )
    lines.append(
        f"note: a small d = {report['config']['dim']} stack on synthetic grids shows the whole "
        "pipeline end to end; the headline kernel numbers (UniTok 8 x 4096 x 8, d = 1024 "
        "compressor, 1024-token decoder) are in README.md and benchmarks/NOTES.md"
    )
    return "\n".join(lines)


def _figure(report, losses, x, x_hat, path) -> str | None:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height, width = report["config"]["grid"]
    # A fixed 3-channel view of the tokens (the first principal directions of x).
    centred = x[0] - x[0].mean(0)
    basis = torch.linalg.svd(centred, full_matrices=False).Vh[:3].T

    def image(tokens):
        rgb = ((tokens - x[0].mean(0)) @ basis).view(height, width, 3)
        low, high = (centred @ basis).min(), (centred @ basis).max()
        return ((rgb - low) / (high - low)).clamp(0, 1).numpy()

    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
    axes[0].plot(losses)
    axes[0].set(
        title="stage-1 training loss\n(reconstruction MSE + VQ loss, teacher forcing)",
        xlabel="step",
        ylabel="loss (log)",
        yscale="log",
    )
    stages = list(STAGES)
    fast = [report["timings"]["fastcompress"][s] * 1e3 for s in stages]
    ref = [report["timings"]["torch reference"][s] * 1e3 for s in stages]
    idx = torch.arange(len(stages)).numpy()
    axes[1].bar(idx - 0.2, fast, 0.4, label="fastcompress", color="tab:green")
    axes[1].bar(idx + 0.2, ref, 0.4, label="torch reference", color="tab:gray")
    for i, (f, r) in enumerate(zip(fast, ref, strict=True)):
        axes[1].text(i - 0.2, f, f"{r / f:.1f}x", ha="center", va="bottom", fontsize=8)
    axes[1].set(
        xticks=idx,
        xticklabels=stages,
        ylabel="ms (log)",
        yscale="log",
        title="stage time, held-out batch",
    )
    axes[1].legend()
    fig.suptitle("grids shown as RGB of their 3 principal directions", x=0.75, fontsize=9)
    axes[2].imshow(image(x[0]))
    axes[2].set(title=f"original ({report['tokens_dense']} tokens)", xticks=[], yticks=[])
    axes[3].imshow(image(x_hat[0]))
    axes[3].set(title=f"regenerated from {report['tokens_compact']} tokens", xticks=[], yticks=[])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
