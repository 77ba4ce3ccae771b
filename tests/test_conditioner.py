"""The prompt-embedding cache: bounded, and never evicts what the batch in hand still needs."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from batch.generate import Conditioner


class _Encoder:
    """Stands in for a pipeline's encode_prompt: one embedding per text, calls counted."""

    _execution_device = "cpu"

    def __init__(self):
        self.calls = []

    def encode_prompt(self, texts, device, count, guidance):
        self.calls.append(list(texts))
        return torch.stack([torch.full((3, 4), float(len(t))) for t in texts]), None


def _conditioner(size: int) -> tuple[Conditioner, _Encoder]:
    encoder = _Encoder()
    return Conditioner(SimpleNamespace(txt2img=encoder), cache_size=size), encoder


def test_an_entry_the_batch_needs_is_not_evicted_by_its_new_neighbours():
    conditioner, encoder = _conditioner(2)
    conditioner.text(["a", "bb"])
    # "a" is the oldest entry; encoding "ccc" for the same batch must not lose it
    out = conditioner.text(["a", "ccc"])
    assert out.shape == (2, 3, 4)
    assert out[0].eq(1).all() and out[1].eq(3).all()
    assert encoder.calls == [["a", "bb"], ["ccc"]]


def test_a_batch_with_more_distinct_texts_than_the_cache_holds():
    conditioner, _ = _conditioner(2)
    texts = ["a", "bb", "ccc", "dddd", "a"]
    out = conditioner.text(texts)
    assert [int(e[0, 0]) for e in out] == [1, 2, 3, 4, 1]
    assert len(conditioner.text_cache) == 2


def test_recently_used_entries_stay():
    conditioner, encoder = _conditioner(2)
    conditioner.text(["a"])
    conditioner.text(["bb"])
    conditioner.text(["a"])  # used again: "bb" is now the least recently used
    conditioner.text(["ccc"])
    conditioner.text(["a"])
    assert encoder.calls == [["a"], ["bb"], ["ccc"]]
