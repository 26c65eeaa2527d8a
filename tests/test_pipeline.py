"""The UniCompress stack: trains (loss falls), fast and reference paths agree on the
same weights, checkpoints round-trip and bad checkpoints fail clearly, demo runs."""

import dataclasses

import pytest
import torch

from fastcompress.demo import format_report, run_demo
from fastcompress.pipeline import (
    StackConfig,
    UniCompressStack,
    load_checkpoint,
    save_checkpoint,
    synthetic_grids,
    train,
)

SMALL = StackConfig(dim=32, grid=(8, 8), heads=4, depth=1, codebook_size=64)


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    stack = UniCompressStack(SMALL)
    losses = train(stack, steps=25, batch=8)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


def test_fast_and_reference_paths_agree():
    torch.manual_seed(1)
    stack = UniCompressStack(SMALL)
    train(stack, steps=3, batch=4)
    x = synthetic_grids(3, SMALL, torch.Generator().manual_seed(5))
    fast = stack.reconstruct(x)
    stack.set_backend("reference")
    reference = stack.reconstruct(x)
    stack.set_backend(None)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        fast_loss = stack(x)
        stack.set_backend("reference")
        reference_loss = stack(x)
    for a, b in zip(fast_loss, reference_loss, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_checkpoint_round_trip(tmp_path):
    stack = UniCompressStack(SMALL)
    train(stack, steps=2, batch=4)
    path = tmp_path / "stack.pt"
    save_checkpoint(stack, str(path))
    loaded = load_checkpoint(str(path))
    assert loaded.config == SMALL
    x = synthetic_grids(2, SMALL, torch.Generator().manual_seed(3))
    torch.testing.assert_close(loaded.reconstruct(x), stack.eval().reconstruct(x))


def test_bad_checkpoints(tmp_path):
    stack = UniCompressStack(SMALL)
    good = tmp_path / "good.pt"
    save_checkpoint(stack, str(good))
    corrupted = tmp_path / "corrupted.pt"
    corrupted.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="corrupted or not a torch file"):
        load_checkpoint(str(corrupted))
    other = tmp_path / "other.pt"
    torch.save({"weights": 1}, other)
    with pytest.raises(ValueError, match="not a fastcompress-stack-v1 checkpoint"):
        load_checkpoint(str(other))
    mismatched = tmp_path / "mismatched.pt"
    payload = torch.load(good, weights_only=True)
    payload["config"] = dataclasses.asdict(dataclasses.replace(SMALL, depth=2))
    torch.save(payload, mismatched)
    with pytest.raises(ValueError, match="does not match its config"):
        load_checkpoint(str(mismatched))


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda p: p["config"].update(colour=1), r"unknown keys \['colour'\]"),
        (lambda p: p["config"].update(grid=4), r"config.grid' must be two positive ints"),
        (lambda p: p["config"].update(stride=3), r"config.stride' must be 2 or 4"),
        (lambda p: p["config"].update(heads=5), r"config.heads' \(5\) must divide"),
        (lambda p: p["config"].update(beta=float("nan")), r"config.beta' must be a finite"),
        (lambda p: p["config"].update(depth=-1), r"config.depth' must be a positive int"),
        (lambda p: p.pop("state_dict"), r"field 'state_dict' is missing"),
        (lambda p: p.pop("config"), r"field 'config' is missing"),
        # The weights are 32 wide: a config of width 100000 (120 GB of weights) is refused
        # from shapes alone, before anything is allocated.
        (lambda p: p["config"].update(dim=100_000), r"does not match its config"),
    ],
)
def test_malformed_checkpoints_name_the_field(tmp_path, edit, match):
    good = tmp_path / "good.pt"
    save_checkpoint(UniCompressStack(SMALL), str(good))
    payload = torch.load(good, weights_only=True)
    edit(payload)
    bad = tmp_path / "bad.pt"
    torch.save(payload, bad)
    with pytest.raises(ValueError, match=match):
        load_checkpoint(str(bad))


def test_demo_end_to_end(tmp_path):
    report = run_demo(steps=4, batch=4, config=SMALL, out_dir=str(tmp_path), progress=False)
    text = format_report(report)
    assert report["tokens_dense"] == 64 and report["tokens_pooled"] == 16
    assert report["tokens_compact"] == 20
    assert report["fast_vs_reference_max_abs_diff"] < 1e-4
    assert report["checkpoint_reload_max_abs_diff"] == 0.0
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    for stage in ("compress", "quantize", "decompress"):
        assert stage in text and report["timings"]["fastcompress"][stage] > 0
