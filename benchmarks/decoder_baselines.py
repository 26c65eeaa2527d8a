"""Plain-torch decoders on an ARDecompressor's weights (benchmark peers): a static
preallocated cache (gpt-fast style) and HF-style caches grown with torch.cat per step."""

import torch
import torch.nn.functional as F


@torch.no_grad()
def generate_plain(model, context, steps, growing: bool):
    batch = context.shape[0]
    blocks = model.blocks
    heads, head_dim = blocks[0].heads, blocks[0].head_dim
    cross = model.context_kv(context)
    cross = [(k.transpose(1, 2), v.transpose(1, 2)) for k, v in cross]  # (B, H, Lc, D)
    if growing:
        caches = [None] * len(blocks)
    else:
        caches = [
            (
                context.new_zeros(batch, heads, steps, head_dim),
                context.new_zeros(batch, heads, steps, head_dim),
            )
            for _ in blocks
        ]
    x = (model.start + model.pos[0]).expand(batch, 1, model.dim)
    out = context.new_empty(batch, steps, model.dim)
    for t in range(steps):
        h = x
        for i, block in enumerate(blocks):
            q, k, v = block.qkv(block.norm1(h)).view(batch, 1, 3, heads, head_dim).unbind(2)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            if growing:
                if caches[i] is None:
                    caches[i] = (k, v)
                else:
                    caches[i] = (torch.cat([caches[i][0], k], 2), torch.cat([caches[i][1], v], 2))
                keys, values = caches[i]
            else:
                caches[i][0][:, :, t] = k[:, :, 0]
                caches[i][1][:, :, t] = v[:, :, 0]
                keys, values = caches[i][0][:, :, : t + 1], caches[i][1][:, :, : t + 1]
            a = F.scaled_dot_product_attention(q, keys, values)
            h = h + block.proj(a.transpose(1, 2).reshape(batch, 1, model.dim))
            q = block.cross_q(block.norm2(h)).view(batch, 1, heads, head_dim).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, *cross[i])
            h = h + block.cross_proj(a.transpose(1, 2).reshape(batch, 1, model.dim))
            h = h + block.mlp(block.norm3(h))
        y = model.head(model.norm(h))
        out[:, t] = y[:, 0]
        if t + 1 < steps:
            x = y + model.pos[t + 1]
    return out
