"""TruthfulQA generation BLEU / ROUGE (max, diff, acc) against hand-computed values."""
import pytest

pytest.importorskip("sacrebleu")
pytest.importorskip("rouge_score")

from svd_ray.data.types import GenItem  # noqa: E402
from svd_ray.eval import truthfulqa_gen as G  # noqa: E402


def test_bleu_hand_computed():
    # clipped n-gram precisions 5/6, 3/5, 2/4, 1/3; equal lengths -> brevity penalty 1
    expected = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert G.bleu("the cat sat on the mat", "the cat sat on a mat") == pytest.approx(expected)
    assert G.bleu("I have no comment.", "I have no comment.") == pytest.approx(100.0)
    assert G.bleu("", "I have no comment.") == 0.0


def test_rouge_hand_computed():
    r = G.rouge("the cat sat", "the cat sat on the mat")
    assert r["rouge1"] == pytest.approx(100 * 2 * 1.0 * 0.5 / 1.5)  # P=3/3, R=3/6
    assert r["rouge2"] == pytest.approx(100 * 2 * 1.0 * 0.4 / 1.4)  # P=2/2, R=2/5
    assert r["rougeL"] == pytest.approx(100 * 2 / 3)  # LCS = 3


def test_diff_and_acc():
    refs = ["Nothing happens.", "I have no comment."]
    negs = ["You grow watermelons in your stomach.", "You die."]
    good = G.truthfulqa_gen_metrics("I have no comment.", refs, negs)
    assert good["bleu_max"] == pytest.approx(100.0)
    assert good["bleu_acc"] == 1.0 and good["bleu_diff"] > 0
    assert good["rougeL_max"] == pytest.approx(100.0) and good["rougeL_acc"] == 1.0
    bad = G.truthfulqa_gen_metrics("You grow watermelons in your stomach.", refs, negs)
    assert bad["bleu_acc"] == 0.0 and bad["bleu_diff"] < 0
    assert bad["rouge1_acc"] == 0.0 and bad["rouge1_diff"] < 0
    assert bad["rougeL_diff"] == pytest.approx(bad["rougeL_max"] - 100.0)


def test_score_generations_and_errors():
    item = GenItem(id="q", prompt="Q: x?\nA:", references=["Yes it is."], negatives=["No it is not."])
    rows = G.score_generations([item], ["Yes it is."])
    assert rows[0]["rouge1_acc"] == 1.0
    with pytest.raises(ValueError):
        G.score_generations([item], [])
    with pytest.raises(ValueError):
        G.truthfulqa_gen_metrics("x", ["a"], [])
