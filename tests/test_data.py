"""Calibration and evaluation text never overlap; windows follow the papers' protocol."""
from __future__ import annotations

import random

import pytest
import torch

from msp import data
from msp.models import ByteTokenizer


def test_embedded_sources_share_no_text():
    book, wiki = data.book_passages(), data.wiki_passages()
    assert len(book) > 4000 and len(wiki) > 2500
    assert not set(book) & set(wiki)
    wiki_text = data.source_text("wiki", "test")
    book_text = data.source_text("book", "train")
    rng = random.Random(0)
    for _ in range(200):  # no 120-character stretch of book text appears in the evaluation text
        start = rng.randrange(0, len(book_text) - 120)
        snippet = book_text[start : start + 120]
        assert snippet not in wiki_text


def test_calibration_windows_and_heldout_slice_are_disjoint():
    tokens = torch.arange(10_000)
    split = data.split_calibration(tokens, 0.1)
    windows = data.random_windows(split.calibration_tokens, 64, 100, seed=0)
    assert int(windows.max()) < split.cut <= int(split.heldout_tokens.min())
    assert set(windows.flatten().tolist()).isdisjoint(split.heldout_tokens.tolist())


def test_random_windows_are_seeded_and_sized():
    tokens = torch.arange(5000)
    a = data.random_windows(tokens, 8, 64, seed=3)
    b = data.random_windows(tokens, 8, 64, seed=3)
    assert a.shape == (8, 64) and torch.equal(a, b)
    assert ((a[:, 1:] - a[:, :-1]) == 1).all()  # contiguous text


def test_sequential_windows_do_not_overlap():
    w = data.sequential_windows(torch.arange(1000), 128)
    assert w.shape == (7, 128)
    assert torch.equal(w.flatten(), torch.arange(7 * 128))
    assert data.sequential_windows(torch.arange(1000), 128, max_windows=3).shape == (3, 128)


def test_heldout_windows_come_from_the_tail_end_past_the_fitness_tokens():
    tail = torch.arange(10_000, 20_000)  # a held-out tail; the search's fitness windows are cut from its start
    w = data.heldout_windows(tail, 512, 40, reserved_tokens=4096)
    assert w.shape == (11, 512)  # (10000 - 4096) // 512 windows fit
    assert int(w[-1, -1]) == 19_999 and int(w.min()) >= 10_000 + 4096  # the end of the tail, never the reserved start
    assert torch.equal(w.flatten(), torch.arange(20_000 - 11 * 512, 20_000))  # contiguous, non-overlapping
    fitness = data.sequential_windows(tail, 256, 2)  # the default search's last stage: 2 x 256 tokens
    assert set(fitness.flatten().tolist()).isdisjoint(w.flatten().tolist())
    assert data.heldout_windows(tail, 512, 3, reserved_tokens=4096).shape == (3, 512)
    with_bos = data.heldout_windows(tail, 512, 2, bos=7, reserved_tokens=4096)
    assert with_bos[:, 0].tolist() == [7, 7] and int(with_bos[-1, -1]) == 19_999


def test_heldout_is_an_evaluation_source_only():
    data.check_source("heldout", evaluation=True)
    with pytest.raises(data.DataError, match="evaluation source only"):
        data.check_source("heldout")


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: data.random_windows(torch.arange(50), 4, 64, 0), "too short"),
        (lambda: data.random_windows(torch.arange(5000), 0, 64, 0), "nsamples=0"),
        (lambda: data.sequential_windows(torch.arange(50), 64), "fewer than one window"),
        (lambda: data.heldout_windows(torch.arange(4500), 512, reserved_tokens=4096), "raise data.heldout_fraction"),
        (lambda: data.tokenize(ByteTokenizer(), "   "), "empty"),
        (lambda: data.check_seqlen(4096, 2048), "longer than the model's context"),
        (lambda: data.source_text("imagenet", "train"), "valid: book, wiki"),
    ],
)
def test_bad_data_requests_name_the_fix(call, message):
    with pytest.raises(data.DataError, match=message):
        call()
