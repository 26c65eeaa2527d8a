"""UniCompress decompressor: an autoregressive Transformer decoder that regenerates the
dense token grid from the compact context ``[G; X_hat]``."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastcompress import _backend, decode_step
from fastcompress._validate import raise_nonfinite
from fastcompress.decode import decode_attention


class DecoderBlock(nn.Module):
    """Pre-norm block: causal self-attention, cross-attention to the context, MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads={heads} must divide dim={dim}")
        self.heads, self.head_dim = heads, dim // heads
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.cross_q, self.cross_kv = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim)
        self.cross_proj = nn.Linear(dim, dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def context_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, Lc, dim)`` -> cross-attention keys and values, each ``(B, Lc, H, D)``."""
        batch, length, _ = context.shape
        kv = self.cross_kv(context).view(batch, length, 2, self.heads, self.head_dim)
        return kv[:, :, 0].contiguous(), kv[:, :, 1].contiguous()

    def forward(self, x: Tensor, ctx_k: Tensor, ctx_v: Tensor) -> Tensor:
        """Teacher forcing: all positions in parallel with a causal mask."""
        batch, length, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, self.heads, -1).unbind(2)
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(attn.transpose(1, 2).reshape(batch, length, dim))
        q = self.cross_q(self.norm2(x)).view(batch, length, self.heads, -1)
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2), ctx_k.transpose(1, 2), ctx_v.transpose(1, 2)
        )
        x = x + self.cross_proj(attn.transpose(1, 2).reshape(batch, length, dim))
        return x + self.mlp(self.norm3(x))

    def step(
        self,
        x: Tensor,
        cache_k: Tensor,
        cache_v: Tensor,
        position: Tensor,
        ctx_k: Tensor,
        ctx_v: Tensor,
        ctx_len: Tensor,
        backend: str | None,
    ) -> Tensor:
        """One decode step: ``x (B, 1, dim)``; its k/v are written at ``position``."""
        batch, _, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, 1, 3, self.heads, -1).unbind(2)
        attn = decode_attention(q, cache_k, cache_v, k, v, cache_seqlens=position, backend=backend)
        x = x + self.proj(attn.reshape(batch, 1, dim))
        q = self.cross_q(self.norm2(x)).view(batch, 1, self.heads, -1)
        attn = decode_attention(q, ctx_k, ctx_v, cache_seqlens=ctx_len, backend=backend)
        x = x + self.cross_proj(attn.reshape(batch, 1, dim))
        return x + self.mlp(self.norm3(x))


class ARDecompressor(nn.Module):
    """Regenerates ``num_tokens`` dense tokens in raster order from a compact context.

    Parameters
    ----------
    dim : token width (of the dense tokens and the model).
    depth, heads : number of blocks and attention heads.
    num_tokens : T, the dense grid size (e.g. 1024 for 32 x 32); learned positions.
    context_dim : width of the context tokens if not ``dim`` (a projection is added).
    local_grid, local_stride, num_meta_tokens : optional local evidence. With the dense
        ``local_grid = (H, W)`` and a context laid out as ``[G (num_meta_tokens);
        X_hat (H/s * W/s, row-major)]``, position t's input also gets a learned projection
        of the pooled token of its own s x s cell (cross-attention still sees everything).

    ``forward(tokens (B, T, dim), context (B, Lc, context_dim)) -> (B, T, dim)``: the
    prediction of token t from the start token and tokens < t (teacher forcing).
    ``generate(context) -> (B, T, dim)``: the same predictions, one token at a time,
    each fed back (optionally re-quantised) as the next input.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        num_tokens: int,
        context_dim: int | None = None,
        mlp_ratio: float = 4.0,
        backend: str | None = None,
        local_grid: tuple[int, int] | None = None,
        local_stride: int = 2,
        num_meta_tokens: int = 0,
    ) -> None:
        super().__init__()
        self.dim, self.num_tokens, self.backend = dim, num_tokens, backend
        self.context_dim = context_dim or dim
        self.start = nn.Parameter(torch.randn(dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(num_tokens, dim) * 0.02)
        self.context_proj = (
            nn.Linear(self.context_dim, dim) if self.context_dim != dim else nn.Identity()
        )
        self.blocks = nn.ModuleList(DecoderBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, dim)
        self.last_cache_bytes = 0
        self.local_proj = None
        if local_grid is not None:
            height, width = local_grid
            if height * width != num_tokens or height % local_stride or width % local_stride:
                raise ValueError(
                    f"local_grid {local_grid} must have num_tokens={num_tokens} "
                    f"cells and be divisible by local_stride={local_stride}"
                )
            row = torch.arange(height).repeat_interleave(width) // local_stride
            col = torch.arange(width).repeat(height) // local_stride
            self.register_buffer(
                "local_index",
                num_meta_tokens + row * (width // local_stride) + col,
                persistent=False,
            )
            self.local_proj = nn.Linear(dim, dim)

    def _check_context(self, context: Tensor) -> None:
        if context.dim() != 3 or context.shape[-1] != self.context_dim or context.shape[1] == 0:
            raise ValueError(
                f"context must be (B, Lc > 0, {self.context_dim}), got {tuple(context.shape)}"
            )

    def context_kv(self, context: Tensor) -> list[tuple[Tensor, Tensor]]:
        ctx = self.context_proj(context)
        return [block.context_kv(ctx) for block in self.blocks]

    def local_evidence(self, context: Tensor) -> Tensor | None:
        """``(B, T, dim)``: the projected pooled token of each position's cell, or None."""
        if self.local_proj is None:
            return None
        if context.shape[1] <= int(self.local_index.max()):
            raise ValueError(
                f"context has {context.shape[1]} tokens; local evidence needs "
                f"{int(self.local_index.max()) + 1} ([G; X_hat])"
            )
        return self.local_proj(self.context_proj(context)[:, self.local_index])

    def forward(self, tokens: Tensor, context: Tensor) -> Tensor:
        self._check_context(context)
        self._check_finite(tokens=tokens, context=context)
        batch, length, dim = tokens.shape
        if dim != self.dim or length > self.num_tokens or context.shape[0] != batch:
            raise ValueError(
                f"tokens must be (B={context.shape[0]}, T <= {self.num_tokens}, "
                f"{self.dim}), got {tuple(tokens.shape)}"
            )
        start = self.start.expand(batch, 1, dim)
        x = torch.cat([start, tokens[:, :-1]], dim=1) + self.pos[:length]
        local = self.local_evidence(context)
        if local is not None:
            x = x + local[:, :length]
        for block, (ctx_k, ctx_v) in zip(self.blocks, self.context_kv(context), strict=True):
            x = block(x, ctx_k, ctx_v)
        return self._checked(self.head(self.norm(x)), tokens=tokens, context=context)

    def _check_finite(self, **inputs: Tensor) -> None:
        """NaN or inf in an input or a parameter is an error naming it: attention kernels
        may drop a NaN score instead of propagating it, so the output alone cannot tell.
        One sum per tensor (small beside a forward); named only on the error path."""
        if torch.compiler.is_compiling():
            return
        named = [*inputs.items(), *self.named_parameters()]
        sums = torch.stack([t.detach().sum(dtype=torch.float64) for _, t in named])
        if not bool(torch.isfinite(sums).all()):  # float64: no overflow from finite values
            raise_nonfinite("ARDecompressor", named)

    def _checked(self, out: Tensor, **inputs: Tensor) -> Tensor:
        """``out``, after a ValueError naming the input or parameter if it is not finite."""
        if torch.compiler.is_compiling() or bool(torch.isfinite(out).all()):
            return out
        raise_nonfinite("ARDecompressor", [*inputs.items(), *self.named_parameters()])

    @torch.no_grad()
    def generate(
        self,
        context: Tensor,
        num_tokens: int | None = None,
        quantize: Callable[[Tensor], Tensor] | None = None,
        use_cuda_graph: bool = False,
        progress: bool = False,
    ) -> Tensor:
        """Autoregressive decoding with a preallocated self-attention cache per layer and
        the cross-attention K/V computed once. ``quantize`` maps each generated token
        ``(B, 1, dim)`` to what is fed back (e.g. ``lambda y: quantizer(y)[0]``)."""
        self._check_context(context)
        self._check_finite(context=context)
        steps = self.num_tokens if num_tokens is None else num_tokens
        if not 0 < steps <= self.num_tokens:
            raise ValueError(
                f"num_tokens must be in [1, {self.num_tokens}] (the position "
                f"table and cache size), got {steps}"
            )
        batch, device = context.shape[0], context.device
        dtype = self.pos.dtype
        block0 = self.blocks[0]
        caches = [
            (
                torch.zeros(
                    batch, steps, block0.heads, block0.head_dim, device=device, dtype=dtype
                ),
                torch.zeros(
                    batch, steps, block0.heads, block0.head_dim, device=device, dtype=dtype
                ),
            )
            for _ in self.blocks
        ]
        # Preallocated once: layers x 2 x B x T x dim elements, no growth per step.
        self.last_cache_bytes = sum(k.nbytes + v.nbytes for k, v in caches)
        cross = self.context_kv(context)
        ctx_len = torch.full((batch,), context.shape[1], dtype=torch.int32, device=device)
        position = torch.zeros(batch, dtype=torch.int32, device=device)
        local = self.local_evidence(context)
        if local is None:
            local = context.new_zeros(batch, steps, self.dim)
        x = (self.start + self.pos[0] + local[:, :1]).contiguous()

        def layers(x: Tensor) -> Tensor:
            for block, (cache_k, cache_v), (ctx_k, ctx_v) in zip(
                self.blocks, caches, cross, strict=True
            ):
                x = block.step(x, cache_k, cache_v, position, ctx_k, ctx_v, ctx_len, self.backend)
            return self.head(self.norm(x))

        if use_cuda_graph and device.type == "cuda":
            layers = _cuda_graph_step(layers, x)

        def step(x: Tensor, t: int) -> Tensor:
            position.fill_(t)
            return layers(x)

        if _backend.requested_backend(self.backend) in ("auto", "cpu"):
            if decode_step.unsupported_reason(self, context) is None:
                step = self._fused_step(caches, cross)
                _backend.record("cpu")
        out = torch.empty(batch, steps, self.dim, device=device, dtype=dtype)
        iterator = range(steps)
        if progress:
            from fastcompress._progress import progress as progress_bar

            iterator = progress_bar(iterator, desc="generate", unit="tok")
        try:
            for t in iterator:
                y = step(x, t)
                if quantize is not None:
                    y = quantize(y)
                out[:, t] = y[:, 0]
                if t + 1 < steps:
                    x = (y + self.pos[t + 1] + local[:, t + 1 : t + 2]).contiguous()
        except ValueError as exc:  # NaN reached an op's check: name where it came from
            if "NaN or inf" in str(exc):
                raise_nonfinite("ARDecompressor", [("context", context), *self.named_parameters()])
            raise
        return self._checked(out, context=context)

    def _fused_step(
        self, caches: list[tuple[Tensor, Tensor]], cross: list[tuple[Tensor, Tensor]]
    ) -> Callable[[Tensor, int], Tensor]:
        """All layers of one step as one C++ op (CPU, float32): see decode_step.py."""
        params = decode_step.pack_params(self)
        cache_k, cache_v = [k for k, _ in caches], [v for _, v in caches]
        ctx_k, ctx_v = [k for k, _ in cross], [v for _, v in cross]
        heads = self.blocks[0].heads
        gelu_tanh = self.blocks[0].mlp[1].approximate == "tanh"

        def step(x: Tensor, t: int) -> Tensor:
            y = decode_step.decoder_step(
                x.view(x.shape[0], -1),
                params,
                cache_k,
                cache_v,
                ctx_k,
                ctx_v,
                t,
                heads,
                self.norm.eps,
                gelu_tanh,
            )
            return y.view(x.shape[0], 1, -1)

        return step

    @torch.no_grad()
    def generate_reference(
        self,
        context: Tensor,
        num_tokens: int | None = None,
        quantize: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """No cache: recompute the whole prefix with ``forward`` at every step (the
        oracle for ``generate``; its cost grows quadratically)."""
        steps = self.num_tokens if num_tokens is None else num_tokens
        batch = context.shape[0]
        out = context.new_zeros(batch, steps, self.dim)
        for t in range(steps):
            y = self.forward(out[:, : t + 1], context)[:, t : t + 1]
            out[:, t] = (quantize(y) if quantize is not None else y)[:, 0]
        return out


def _cuda_graph_step(step: Callable, x: Tensor) -> Callable:
    """Capture one decode step in a CUDA graph; replays read the static ``x`` and the
    step's position buffer (both updated in place) and return the static output."""
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph (allocations, autotune)
        step(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step(static_x)

    def replay(x: Tensor) -> Tensor:
        static_x.copy_(x)
        graph.replay()
        return static_out

    return replay
