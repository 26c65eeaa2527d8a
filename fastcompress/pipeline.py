"""A small UniCompress-style stack on synthetic token grids: the library's main job.

``UniCompressor`` (2 x 2 pooling + 4 meta tokens) -> ``MultiCodebookQuantizer`` (the
compact sequence becomes discrete indices) -> ``ARDecompressor`` (regenerates the dense
grid). Stage-1 training: reconstruction (teacher forcing) + VQ loss. Everything is
generated here; nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastcompress._progress import progress as progress_bar
from fastcompress.compress import compress
from fastcompress.nn import ARDecompressor, MultiCodebookQuantizer, UniCompressor

CHECKPOINT_FORMAT = "fastcompress-stack-v1"


@dataclasses.dataclass(frozen=True)
class StackConfig:
    dim: int = 64
    grid: tuple[int, int] = (16, 16)
    stride: int = 2
    meta_tokens: int = 4
    heads: int = 4
    depth: int = 2
    num_codebooks: int = 8
    codebook_size: int = 256  # per codebook
    beta: float = 0.25
    vq_weight: float = 1.0
    # Noise on the teacher-forced inputs during training: generation feeds back its own
    # predictions, and this keeps the decoder from trusting its inputs blindly.
    input_noise: float = 0.1


def synthetic_grids(batch: int, config: StackConfig, generator: torch.Generator) -> Tensor:
    """Structured token grids ``(B, H*W, dim)``: smooth random fields (a 4 x 4 latent
    upsampled bilinearly) through a fixed random projection and tanh, so neighbouring
    tokens are correlated (pooling keeps most of the signal) but no two grids agree."""
    height, width = config.grid
    latent = torch.randn(batch, 8, max(2, height // 4), max(2, width // 4), generator=generator)
    field = F.interpolate(latent, size=(height, width), mode="bilinear", align_corners=False)
    proj = torch.randn(8, config.dim, generator=torch.Generator().manual_seed(1234)) / 8**0.5
    tokens = torch.tanh(field.permute(0, 2, 3, 1) @ proj)
    return tokens.reshape(batch, height * width, config.dim)


class UniCompressStack(nn.Module):
    """Compressor + quantizer + decompressor with one ``backend`` switch."""

    def __init__(self, config: StackConfig, backend: str | None = None) -> None:
        super().__init__()
        self.config = config
        quantizer = MultiCodebookQuantizer(
            config.codebook_size * config.num_codebooks,
            config.dim,
            beta=config.beta,
            num_codebooks=config.num_codebooks,
        )
        self.compressor = UniCompressor(
            config.dim,
            config.heads,
            config.grid,
            config.stride,
            config.meta_tokens,
            quantizer=quantizer,
        )
        tokens = config.grid[0] * config.grid[1]
        self.decompressor = ARDecompressor(
            config.dim,
            config.depth,
            config.heads,
            tokens,
            local_grid=config.grid,
            local_stride=config.stride,
            num_meta_tokens=config.meta_tokens,
        )
        self.set_backend(backend)

    def set_backend(self, backend: str | None) -> None:
        for module in self.modules():
            if hasattr(module, "backend"):
                module.backend = backend

    @property
    def quantizer(self) -> MultiCodebookQuantizer:
        return self.compressor.quantizer

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Stage-1 loss on ``x (B, T, dim)``: (total, reconstruction, vq)."""
        compact = self.compressor(x)
        inputs = x + self.config.input_noise * torch.randn_like(x) if self.training else x
        prediction = self.decompressor(inputs, compact.quantized.z_q)
        recon = F.mse_loss(prediction, x)
        vq = compact.quantized.vq_loss
        return recon + self.config.vq_weight * vq, recon, vq

    @torch.no_grad()
    def reconstruct(self, x: Tensor, timings: dict[str, float] | None = None) -> Tensor:
        """Compress, quantise, regenerate: ``x (B, T, dim)`` -> ``(B, T, dim)``."""
        with _timed(timings, "compress"):
            meta, pooled = compress(
                x,
                self.config.grid,
                self.config.stride,
                *self.compressor.extractor.attention_weights(),
                backend=self.compressor.backend,
            )
        with _timed(timings, "quantize"):
            out, _ = self.quantizer.quantize(torch.cat([meta, pooled], dim=1))
        with _timed(timings, "decompress"):
            return self.decompressor.generate(out.z_q)


@contextlib.contextmanager
def _timed(timings: dict[str, float] | None, name: str):
    """Add the block's wall time to ``timings[name]`` (nothing when timings is None)."""
    start = time.perf_counter()
    yield
    if timings is not None:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def train(
    stack: UniCompressStack,
    steps: int,
    batch: int = 16,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = False,
) -> list[float]:
    """Stage-1 training on fresh synthetic grids each step; returns the loss curve."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(stack.parameters(), lr=lr, weight_decay=0.0)
    stack.train()
    losses = []
    recons: list[float] = []
    iterator = range(steps)
    if progress:
        iterator = progress_bar(
            iterator,
            desc="train",
            unit="step",
            postfix=lambda: f"loss={losses[-1]:.4f} recon={recons[-1]:.4f}",
        )
    for _ in iterator:
        x = synthetic_grids(batch, stack.config, generator)
        loss, recon, _ = stack(x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        recons.append(float(recon.detach()))
    stack.eval()
    return losses


def save_checkpoint(stack: UniCompressStack, path: str) -> None:
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "config": dataclasses.asdict(stack.config),
            "state_dict": stack.state_dict(),
        },
        path,
    )


def load_checkpoint(path: str, backend: str | None = None) -> UniCompressStack:
    """Load a stack saved by :func:`save_checkpoint`. Anything else is a ``ValueError``
    naming the field: the config is checked against :class:`StackConfig` and against the
    shapes of the saved weights (on the meta device) before any memory is allocated."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupted, or not a torch file at all
        raise ValueError(f"checkpoint {path!r} is corrupted or not a torch file: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path!r} is not a {CHECKPOINT_FORMAT} checkpoint")
    config = _checked_config(path, payload.get("config"))
    state = payload.get("state_dict")
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise ValueError(f"checkpoint {path!r}: field 'state_dict' is missing or not tensors")
    with torch.device("meta"):  # shapes only: nothing is allocated yet
        try:
            skeleton = UniCompressStack(config, backend=backend)
        except (ValueError, TypeError, AssertionError, RuntimeError) as exc:
            raise ValueError(f"checkpoint {path!r}: field 'config' is invalid: {exc}") from exc
        wanted = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    missing = sorted(set(wanted) - set(state))
    unexpected = sorted(set(state) - set(wanted))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path!r}: field 'state_dict' does not match its config: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for key, shape in wanted.items():
        if tuple(state[key].shape) != shape:
            raise ValueError(
                f"checkpoint {path!r}: field 'state_dict' does not match its config: {key} is "
                f"{tuple(state[key].shape)}, field 'config' ({config}) needs {shape}"
            )
    stack = UniCompressStack(config, backend=backend)
    stack.load_state_dict(state, strict=True)
    return stack.eval()


def _checked_config(path: str, raw: object) -> StackConfig:
    """``raw`` as a :class:`StackConfig`, every field of the right kind and range."""
    if not isinstance(raw, dict):
        raise ValueError(f"checkpoint {path!r}: field 'config' is missing or not a dict")
    fields = {f.name: f for f in dataclasses.fields(StackConfig)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ValueError(f"checkpoint {path!r}: field 'config' has unknown keys {unknown}")
    values = dict(raw)
    for name, value in values.items():
        where = f"checkpoint {path!r}: field 'config.{name}'"
        if name == "grid":
            if not (
                isinstance(value, (tuple, list))
                and len(value) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
            ):
                raise ValueError(f"{where} must be two positive ints (H, W), got {value!r}")
            values[name] = tuple(value)
        elif fields[name].type in ("int", int):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{where} must be a positive int, got {value!r}")
        elif (
            not isinstance(value, (int, float)) or not value == value or abs(value) == float("inf")
        ):
            raise ValueError(f"{where} must be a finite number, got {value!r}")
    config = StackConfig(**values)
    if config.stride not in (2, 4) or any(g % config.stride for g in config.grid):
        raise ValueError(
            f"checkpoint {path!r}: field 'config.stride' must be 2 or 4 and divide the grid "
            f"{config.grid}, got {config.stride}"
        )
    if config.dim % config.heads:
        raise ValueError(
            f"checkpoint {path!r}: field 'config.heads' ({config.heads}) must divide "
            f"config.dim ({config.dim})"
        )
    return config


def upsample_pooled(pooled: Tensor, config: StackConfig) -> Tensor:
    """Nearest-neighbour upsampling of the pooled tokens back to the dense grid: what the
    compression alone keeps (the yardstick for the decompressor)."""
    height, width = config.grid
    s = config.stride
    grid = pooled.view(pooled.shape[0], height // s, 1, width // s, 1, -1)
    return grid.expand(-1, -1, s, -1, s, -1).reshape(pooled.shape[0], height * width, -1)
