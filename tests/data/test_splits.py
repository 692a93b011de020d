"""Deterministic, non-overlapping, order-independent splits."""
import random

import pytest

from svd_ray.data.splits import SplitRecord, ids_digest, make_split, split_sizes

IDS = [f"item-{i}" for i in range(817)]


def test_sizes_largest_remainder():
    assert split_sizes(817, {"train": 0.4, "calibration": 0.1, "eval": 0.5}) == {
        "train": 327, "calibration": 82, "eval": 408,
    }
    assert split_sizes(10, {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}) == {"a": 4, "b": 3, "c": 3}
    assert sum(split_sizes(7, {"a": 0.5, "b": 0.5}).values()) == 7
    with pytest.raises(ValueError):
        split_sizes(10, {"a": 0.5, "b": 0.4})
    with pytest.raises(ValueError):
        split_sizes(10, {"a": 1.5, "b": -0.5})


def test_same_seed_same_split_any_input_order():
    a = make_split(IDS, seed=3)
    shuffled = IDS[:]
    random.Random(0).shuffle(shuffled)
    b = make_split(shuffled, seed=3)
    assert a == b
    assert a.sha256 == b.sha256


def test_different_seed_differs():
    assert make_split(IDS, seed=0).ids["eval"] != make_split(IDS, seed=1).ids["eval"]


def test_no_overlap_and_cover():
    rec = make_split(IDS, {"train": 0.4, "calibration": 0.1, "eval": 0.5}, seed=0)
    train, cal, ev = (set(rec[k]) for k in ("train", "calibration", "eval"))
    assert not (train & cal) and not (train & ev) and not (cal & ev)
    assert train | cal | ev == set(IDS)
    assert rec.sha256["eval"] == ids_digest(rec["eval"])
    assert rec.universe_sha256 == ids_digest(IDS)
    assert rec.split_of(rec["calibration"][0]) == "calibration"


def test_record_roundtrip_and_tamper():
    rec = make_split(IDS, seed=5, dataset="x")
    d = rec.to_dict()
    assert d["sizes"] == {"train": 327, "calibration": 82, "eval": 408}
    assert SplitRecord.from_dict(d) == rec
    d["ids"]["eval"].append(d["ids"]["train"][0])
    with pytest.raises(ValueError):
        SplitRecord.from_dict(d)


def test_duplicate_ids_rejected():
    with pytest.raises(ValueError, match="unique"):
        make_split(["a", "b", "a"])


def test_select_keeps_input_order():
    class It:
        def __init__(self, i):
            self.id = i

    items = [It(i) for i in IDS]
    rec = make_split(IDS, seed=0)
    sel = rec.select(items, "eval")
    assert [x.id for x in sel] == [i for i in IDS if i in set(rec["eval"])]
