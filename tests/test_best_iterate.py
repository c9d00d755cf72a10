"""The synthesis loops' choice of the iterate to keep, made on the device (methods/base.py)."""
import math

import torch

from methods.base import BestIterate


def offer_all(losses):
    best = BestIterate()
    x = torch.zeros(2)
    for i, loss in enumerate(losses):
        x.fill_(i)  # updated in place after each offer, as DeepInversion's images are
        best.offer({"a": torch.tensor(loss * 2)}, torch.tensor(loss), x)
    (kept,), report = best.result()
    return kept, report


def test_keeps_the_strictly_lowest_and_copies_it():
    kept, report = offer_all([3.0, 1.0, 2.0, 1.0, 5.0])
    assert kept.tolist() == [1.0, 1.0]  # the first of two equal minima, unaffected by later fills
    assert report == {"a": 2.0, "total": 1.0}


def test_a_nan_never_replaces_an_iterate():
    kept, report = offer_all([1.0, float("nan"), 2.0])
    assert kept.tolist() == [0.0, 0.0] and report == {"a": 2.0, "total": 1.0}
    kept, report = offer_all([2.0, float("nan"), 0.5])  # and does not block a later, lower one
    assert kept.tolist() == [2.0, 2.0] and report == {"a": 1.0, "total": 0.5}


def test_a_nan_first_iterate_is_kept():
    kept, report = offer_all([float("nan"), 1.0, 0.5])
    assert kept.tolist() == [0.0, 0.0] and math.isnan(report["total"])
