"""maj@k / pass@k / mean accuracy on hand-computed examples, and the image-blind control."""

import dataclasses

import pytest

from medee_jax.evaluation.blind import blank_images, shuffled_images
from medee_jax.evaluation.items import ImageRef, MCItem
from medee_jax.evaluation.metrics import maj_at_k, majority_score, pass_at_k, scaling_curve, scaling_ks, summarize
from tests.eval_fixtures import png_bytes, write_png


def test_pass_at_k_hand_computed():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(4, 0, 1) == 0.0 and pass_at_k(4, 4, 1) == 1.0
    assert pass_at_k(3, 1, 3) == 1.0  # fewer wrong samples than k
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_majority_with_ties_and_abstentions():
    assert majority_score(["A", "B"], "A") == 0.5
    assert majority_score(["A", "B", "C"], "D") == 0.0
    assert majority_score([None, None], "A") == 0.0
    assert majority_score(["B", None, "B", "A"], "B") == 1.0
    assert maj_at_k(["A", "B", "A", "C"], "A", 1) == 0.5
    assert maj_at_k(["A", "B", "A", "C"], "A", 2) == 0.5  # [A,B] tie -> 1/2, [A,C] tie -> 1/2
    assert maj_at_k(["A", "B", "A", "C"], "A", 4) == 1.0
    assert maj_at_k(["A", "B", "A", "C", "C"], "C", 2) == 0.25  # blocks [A,B] -> 0, [A,C] -> 1/2; sample 5 unused


def test_scaling_curve_hand_computed():
    items = [(["A", "B", "A", "C"], "A"), (["B", "B", None, "D"], "D")]
    assert scaling_ks(4) == [1, 2, 4] and scaling_ks(5) == [1, 2, 4, 5] and scaling_ks(1) == [1]
    curve = scaling_curve(items, 4)
    assert curve[1] == pytest.approx({"mean": 0.5, "maj": (0.5 + 0.25) / 2, "pass": (0.5 + 0.25) / 2})
    assert curve[2] == pytest.approx({"mean": 0.25, "maj": (0.5 + 0.5) / 2, "pass": (5 / 6 + 0.5) / 2})
    assert curve[4] == pytest.approx({"mean": 0.375, "maj": 0.5, "pass": 1.0})
    summary = summarize([{"answers": a, "truth": t} for a, t in items], 4)
    assert summary["accuracy"] == pytest.approx(3 / 8) and summary["parse_failure_rate"] == pytest.approx(1 / 8)
    assert summary["items"] == 2 and summary["samples"] == 8 and set(summary["scaling"]) == {"1", "2", "4"}


def _item(i, images, subset="s"):
    return MCItem(id=f"q{i}", question=f"Question {i}?", options=("a", "b"), answer="A", images=tuple(images),
                  subset=subset, benchmark="t", source=f"f:{i}")


def test_blind_controls_change_only_the_images(tmp_path):
    x = ImageRef(path=write_png(tmp_path / "x.png", 1, (10, 7)))
    y = ImageRef(path=write_png(tmp_path / "y.png", 2, (12, 9)))
    z, w = ImageRef(data=png_bytes(3)), ImageRef(data=png_bytes(4))
    items = [_item(0, [x]), _item(1, [x]), _item(2, [x]), _item(3, [y]), _item(4, [y]), _item(5, [z]),
             _item(6, [x, y]), _item(7, []), _item(8, [z, w]), _item(9, [x, y, z])]
    blank = blank_images(items)
    assert [b.id for b in blank] == [i.id for i in items if i.images]  # text-only item 7 has nothing to blind
    by_id = {i.id: i for i in items}
    for b in blank:
        original = by_id[b.id]
        assert dataclasses.replace(b, images=original.images) == original
        assert [im.blank_size for im in b.images] == [im.size() for im in original.images]
        assert b.images[0].load().getpixel((0, 0)) == (128, 128, 128)

    shuffled, left_out = shuffled_images(items, seed=3)
    assert left_out == 1  # item 9 is the only item with three images
    assert sorted(s.id for s in shuffled) == ["q0", "q1", "q2", "q3", "q4", "q5", "q6", "q8"]
    donors = []
    for s in shuffled:
        original = by_id[s.id]
        assert dataclasses.replace(s, images=original.images) == original
        assert not {im.sha256() for im in s.images} & {im.sha256() for im in original.images}
        donors.append(s.images)
    singles = [s.images for s in shuffled if len(s.images) == 1]
    assert sorted(im[0].sha256() for im in singles) == sorted(by_id[f"q{i}"].images[0].sha256() for i in range(6))
    # items sharing an image file (q0-q2 show x) never get x back; two items that share an image cannot swap
    assert shuffled_images([_item(0, [x, y]), _item(1, [y, z])], seed=0) == ([], 2)
    assert shuffled_images(items, seed=3) == (shuffled, left_out)  # seeded
    distinct = [_item(i, [ImageRef(data=png_bytes(10 + i))]) for i in range(8)]
    assert shuffled_images(distinct, seed=4) != shuffled_images(distinct, seed=5)
