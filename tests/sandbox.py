"""A child process that runs fastcompress calls for the property tests.

A crash (SIGSEGV, SIGBUS, SIGFPE, abort) or a hang in one example kills or stalls the
child, not the test run: the parent raises :class:`Crashed` with the example that did it
(a reproducer) and starts a fresh child for the next one. Each call also reports the ISA
level its C++ kernels ran at and the backends it chose, so that a test can assert that
it ran what its id names.

Run as a script, this file is the child: it reads ``(op, args, kwargs, level)`` records
(``torch.save``, length-prefixed) on stdin and answers on stdout.
"""

from __future__ import annotations

import io
import os
import select
import struct
import subprocess
import sys

import torch

_HEADER = struct.Struct("<Q")


class Crashed(AssertionError):
    """The child died or hung on an example."""


def _dumps(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _loads(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)  # our own child: trusted


class Sandbox:
    def __init__(self, timeout: float = 120.0) -> None:
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None

    def _start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-X", "faulthandler", __file__],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=dict(os.environ),
        )  # fmt: skip

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def _read(self, size: int, example: str) -> bytes:
        data = b""
        while len(data) < size:
            ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
            if not ready:
                self.close()
                raise Crashed(f"hung for {self.timeout:.0f} s on {example}")
            chunk = os.read(self.proc.stdout.fileno(), size - len(data))
            if not chunk:
                code = self.proc.wait()
                err = self.proc.stderr.read().decode(errors="replace")[-3000:]
                self.proc = None
                raise Crashed(f"the child died (exit {code}) on {example}\n{err}")
            data += chunk
        return data

    def call(self, op: str, *args, level: str | None = None, **kwargs):
        """``(result, report)`` of ``op(*args, **kwargs)`` in the child, or the
        exception it raised (re-raised here with its type and message)."""
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        example = _describe(op, args, kwargs, level)
        payload = _dumps((op, args, kwargs, level))
        self.proc.stdin.write(_HEADER.pack(len(payload)) + payload)
        self.proc.stdin.flush()
        (size,) = _HEADER.unpack(self._read(_HEADER.size, example))
        status, value, report = _loads(self._read(size, example))
        if status == "error":
            kind, message = value
            raise _EXCEPTIONS.get(kind, UnexpectedError)(
                message if kind in _EXCEPTIONS else f"{kind}: {message} [{example}]"
            )
        return value, report


class UnexpectedError(AssertionError):
    """The op raised something other than a clear ValueError / TypeError (or, for a
    forced backend that cannot take the shape, BackendUnavailableError)."""


class BackendUnavailable(RuntimeError):
    """fastcompress.BackendUnavailableError, raised in the child."""


_EXCEPTIONS = {
    "ValueError": ValueError,
    "TypeError": TypeError,
    "BackendUnavailableError": BackendUnavailable,
}


def _describe(op, args, kwargs, level) -> str:
    def one(value):
        if isinstance(value, torch.Tensor):
            return (
                f"Tensor{tuple(value.shape)}:{str(value.dtype).removeprefix('torch.')}"
                f":stride{value.stride()}:{value.device.type}"
            )
        if isinstance(value, (list, tuple)):
            return type(value)(one(v) for v in value)
        return repr(value)

    parts = [str(one(a)) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    return f"{op}({', '.join(parts)}) at ISA level {level or 'best'}"


# --------------------------------------------------------------------------- the child


def _ops():
    import fastcompress as fc

    def with_grads(fn, inputs: dict, weights: dict, **kwargs):
        """``fn(**inputs, **kwargs)`` with ``inputs`` requiring grad, then the backward of
        ``sum_i sum(out_i * weights[i])`` plus every scalar output (the losses): the
        outputs and the inputs' gradients."""
        leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}
        out = fn(**leaves, **kwargs)
        seq = list(out) if isinstance(out, tuple) else [out]
        loss = torch.zeros(())
        for i, value in enumerate(seq):
            if i in weights:
                loss = loss + (value.float() * weights[i]).sum()
            elif isinstance(value, torch.Tensor) and value.dim() == 0 and value.requires_grad:
                loss = loss + value
        loss.backward()
        grads = {k: v.grad for k, v in leaves.items()}
        return [v.detach() if isinstance(v, torch.Tensor) else v for v in seq], grads

    def compress_named(
        x, queries, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, *,
        grid, stride, num_heads, backend=None,
    ):  # fmt: skip
        return fc.compress(
            x, grid, stride, queries, in_proj_weight, in_proj_bias, out_proj_weight,
            out_proj_bias, num_heads, backend=backend,
        )  # fmt: skip

    def voco(q, k, v, layout, **kwargs):
        return fc.voco_attention(q, k, v, fc.VocoLayout(*layout), **kwargs)

    def compact(k_cache, v_cache, layout):
        k, v, kept = fc.compact_kv_cache(k_cache, v_cache, fc.VocoLayout(*layout))
        return k, v, (kept.n_prefix, kept.n_hybrid, kept.n_voco, kept.n_text)

    def decode(q, k_cache, v_cache, k=None, v=None, **kwargs):
        out = fc.decode_attention(q, k_cache, v_cache, k, v, **kwargs)
        return (*out, k_cache, v_cache) if isinstance(out, tuple) else (out, k_cache, v_cache)

    return {
        "mcq_search": fc.mcq_search,
        "mcq_quantize": lambda *a, **k: tuple(fc.mcq_quantize(*a, **k)),
        "mcq_quantize_grad": lambda inputs, weights, **k: with_grads(
            fc.mcq_quantize, inputs, weights, **k
        ),
        "mcq_dequantize": fc.mcq_dequantize,
        "compress": compress_named,
        "compress_grad": lambda inputs, weights, **k: with_grads(
            compress_named, inputs, weights, **k
        ),
        "meta_token_attention": fc.meta_token_attention,
        "pool_compress": fc.pool_compress,
        "decode_attention": decode,
        "voco_attention": voco,
        "compact_kv_cache": compact,
    }


def _serve() -> None:
    from fastcompress import _backend, _ext

    ops = _ops()
    has_ext = _ext.load_cpu_extension(raise_on_error=False)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        header = stdin.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return
        op, args, kwargs, level = _loads(stdin.read(_HEADER.unpack(header)[0]))
        if level is not None:
            _ext.set_cpu_isa(level)
        calls_before = _ext.kernel_calls() if has_ext else {}
        chosen_before = _backend.selections.copy()
        try:
            value, status = ops[op](*args, **kwargs), "ok"
        except Exception as exc:  # reported to the parent, which decides
            value, status = (type(exc).__name__, str(exc)), "error"
        report = {
            "calls": {k: v - calls_before[k] for k, v in _ext.kernel_calls().items()}
            if has_ext
            else {},
            "chosen": dict(_backend.selections - chosen_before),
            "level": _ext.cpu_isa() if has_ext else None,
        }
        payload = _dumps((status, value, report))
        stdout.write(_HEADER.pack(len(payload)) + payload)
        stdout.flush()


if __name__ == "__main__":
    _serve()
