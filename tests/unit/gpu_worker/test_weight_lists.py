"""LoraStep's per-(layer, projection) weight lists, kept across steps by WeightLists: reused while the
adapters and their landed layers stay the same, rebuilt when either changes."""

from __future__ import annotations

import torch

from services.gpu_worker.lora_plan import LoraSegment, LoraStep, WeightLists
from shared.peft_adapter import LoraAdapter


def _adapter(name: str, layers: range, rank: int = 4) -> LoraAdapter:
    weights = {(layer, "q_proj"): (torch.full((8, rank), float(layer)), torch.ones(rank, 8)) for layer in layers}
    return LoraAdapter(name, f"/{name}", weights)


def _step(lists: WeightLists, *adapters: LoraAdapter) -> LoraStep:
    segments = [LoraSegment(i, i + 1, ad) for i, ad in enumerate(adapters)]
    return LoraStep(segments, lambda y, x, batch: None, torch.float32, torch.device("cpu"), None, lists)


def test_lists_are_reused_while_the_adapters_stay_the_same():
    lists, a, b = WeightLists(), _adapter("a", range(2)), _adapter("b", range(2))
    first = _step(lists, a, b)._device_batch(1, "q_proj")
    again = _step(lists, a, b)._device_batch(1, "q_proj")
    assert again.A is first.A and again.B is first.B
    assert [w[0, 0].item() for w in first.A] == [1.0, 1.0] and first.max_rank == again.max_rank == 4


def test_lists_are_rebuilt_when_a_layer_lands_or_the_adapters_change():
    lists, a, b = WeightLists(), _adapter("a", range(1)), _adapter("b", range(2), rank=6)
    before = _step(lists, a, b)._device_batch(1, "q_proj")
    assert before.A[0].numel() == 0  # a's layer 1 has not landed
    a.weights[(1, "q_proj")] = (torch.full((8, 9), 7.0), torch.ones(9, 8))
    assert before.max_rank == 6  # b's
    landed = _step(lists, a, b)._device_batch(1, "q_proj")
    assert landed.A[0][0, 0].item() == 7.0 and landed.max_rank == 9
    swapped = _step(lists, b, a)._device_batch(1, "q_proj")  # another order: other indices
    assert swapped.A[0][0, 0].item() == 1.0 and swapped.A[1][0, 0].item() == 7.0
    c = _adapter("c", range(2))
    assert len(_step(lists, b, c)._device_batch(0, "q_proj").A) == 2


def test_clear_lets_go_of_the_adapters():
    """A step without eager LoRA clears the lists, so an evicted adapter's weights are not kept alive."""
    import gc
    import weakref

    lists, a = WeightLists(), _adapter("a", range(2))
    _step(lists, a)._device_batch(0, "q_proj")
    gone = weakref.ref(a.weights[(0, "q_proj")][0])
    lists.clear()
    del a
    gc.collect()
    assert gone() is None
