"""One way to run blocks on a device: :func:`msp.pipeline.block_on` always puts a block back, and
:func:`msp.pipeline.batch_logits` gives the same batches and logits whether the plan streams the model or not."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from msp.models import build_tiny_model, find_blocks, prunable_layers
from msp.pipeline import batch_logits, block_on, window_passes
from msp.sensitivity import compute_sensitivity
from msp.streaming import plan_streaming

MSP = Path(__file__).resolve().parents[1] / "msp"


class _Recorder(nn.Linear):
    """A module whose ``.to`` calls are recorded (the device a block is sent to) instead of done: no GPU needed."""

    def __init__(self):
        super().__init__(2, 2)
        self.moves: list[str] = []

    def to(self, device):
        self.moves.append(str(device))
        return self


def test_block_on_puts_the_block_back_also_after_an_exception():
    gpu = torch.device("cuda", 0)  # only named: the recorder moves nothing
    block = _Recorder()
    with block_on(block, gpu) as inside:
        assert inside is block and block.moves == ["cuda:0"]
    assert block.moves == ["cuda:0", "cpu"]
    block = _Recorder()
    with pytest.raises(RuntimeError, match="boom"):
        with block_on(block, gpu):
            raise RuntimeError("boom")
    assert block.moves == ["cuda:0", "cpu"]


def test_no_other_code_moves_a_block():
    """Every stage moves decoder blocks with block_on: no other ``block.to(`` / ``blocks[i].to(`` in msp/."""
    pattern = re.compile(r"\bblocks?(\[[^\]]*\])?\.to\(")
    hits = [f"{p.relative_to(MSP)}:{i}" for p in MSP.rglob("*.py") for i, line in enumerate(p.read_text().splitlines(), 1)
            if pattern.search(line)]
    assert len(hits) == 2 and all(h.startswith("pipeline.py:") for h in hits), hits  # block_on: there and back


@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-opt"])
def test_streamed_and_resident_logits_are_the_same_batches(kind, cpu):
    model = build_tiny_model(kind, seed=2).model.eval()
    windows = torch.randint(0, 256, (5, 20), generator=torch.Generator().manual_seed(4))
    resident = list(batch_logits(model, windows, cpu, batch_size=2))
    plan = plan_streaming(model, cpu, "true", nsamples=3)  # passes of 2 windows (3 rounded down to whole batches)
    streamed = list(batch_logits(model, windows, cpu, plan=plan, batch_size=2))
    assert [b.tolist() for b, _ in resident] == [b.tolist() for b, _ in streamed] == [windows[i : i + 2].tolist() for i in (0, 2, 4)]
    for (_, a), (_, b) in zip(resident, streamed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert len(find_blocks(model)[1]) == 2  # the head trick put the real blocks back


def test_window_passes_never_split_a_batch():
    windows = torch.arange(14).reshape(7, 2)
    spans = [(label, chunk[:, 0].tolist()) for label, chunk in window_passes(windows, 5, batch_size=2)]
    assert spans == [("1-4/7", [0, 2, 4, 6]), ("5-7/7", [8, 10, 12])]
    assert [label for label, _ in window_passes(windows, None)] == ["1-7/7"]
    with pytest.raises(ValueError, match="at least 1"):
        list(window_passes(windows, -1))


def test_compute_sensitivity_streamed_equals_resident_and_shares_the_cache_entry(tmp_path, cpu):
    from msp.cache import DiskCache

    model = build_tiny_model("tiny-llama", seed=0).model
    layers = prunable_layers(model)
    windows = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(5))
    kw = dict(device=cpu, seed=0, batch_size=2)
    resident = compute_sensitivity(model, layers, windows, "fisher", {}, **kw)
    streamed = compute_sensitivity(model, layers, windows, "fisher", {}, plan=plan_streaming(model, cpu, "true", nsamples=2), **kw)
    assert streamed.values == pytest.approx(resident.values, rel=1e-5)
    cache = DiskCache(tmp_path / "cache")
    fields = {"model": "tiny-llama", "seed": 0}
    compute_sensitivity(model, layers, windows, "fisher", {}, cache=cache, cache_fields=fields, **kw)
    compute_sensitivity(model, layers, windows, "fisher", {}, cache=cache, cache_fields=fields,
                        plan=plan_streaming(model, cpu, "true", nsamples=2), **kw)
    assert cache.misses == 1 and cache.hits == 1
