"""The online-softmax tile update shared by the attention kernels."""

import triton
import triton.language as tl


@triton.jit
def online_softmax_step(scores, v, acc, m_i, l_i):
    """Fold one key tile into (acc, running max, running sum). ``scores (rows, keys)``
    with -inf where a key is not visible; ``v (keys, D)`` float32."""
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    # Rows that have seen no visible key yet keep m = -inf: guard exp(-inf - -inf).
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(scores - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    return acc, m_new, l_i
