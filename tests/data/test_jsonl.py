"""User JSONL tasks: valid files load; every error names line and field."""
import json

import pytest

from svd_ray.data import JSONLFormatError, load_jsonl_gen, load_jsonl_mc, load_jsonl_train, write_jsonl


def _file(tmp_path, lines, name="task.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return p


def test_mc_valid(tmp_path):
    p = _file(tmp_path, [
        {"id": "q1", "prompt": "Q: 2 + 2 = ?\nA:", "choices": [" 4", " 5"], "label": 0},
        "",
        {"id": 7, "prompt": "P", "choices": [" a", " b", " c"], "labels": [1, 0, 1], "source": "mine"},
        {"prompt": "P2", "choices": [" a", " b"], "label": 1, "extra": "ignored"},
    ])
    items = load_jsonl_mc(p)
    assert [it.id for it in items] == ["q1", "7", "task-4"]
    assert items[0].labels == [1, 0] and items[1].labels == [1, 0, 1] and items[2].labels == [0, 1]
    assert items[0].source == "task" and items[1].source == "mine"


def test_gen_and_train_valid(tmp_path):
    p = _file(tmp_path, [
        {"id": "g1", "prompt": "Q: Capital of France?\nA:", "answer": " Paris", "negatives": [" Lyon"]},
        {"id": "g2", "prompt": "Q?\nA:", "answer": " x", "references": [" y"]},
    ])
    gen = load_jsonl_gen(p)
    assert gen[0].references == [" Paris"] and gen[0].negatives == [" Lyon"]
    assert gen[1].references == [" x", " y"]
    train = load_jsonl_train(p)
    assert [(t.id, t.prompt, t.answer) for t in train] == [("g1", "Q: Capital of France?\nA:", " Paris"), ("g2", "Q?\nA:", " x")]


@pytest.mark.parametrize(
    "bad, lineno, field, message",
    [
        ('{"id": "x", "prompt": ', 2, None, "invalid JSON"),
        ([1, 2], 2, None, "expected a JSON object"),
        ({"id": "b", "choices": [" a", " b"], "label": 0}, 2, "prompt", "missing"),
        ({"id": "b", "prompt": "", "choices": [" a", " b"], "label": 0}, 2, "prompt", "must not be empty or only whitespace"),
        ({"id": "b", "prompt": "P", "label": 0}, 2, "choices", "missing"),
        ({"id": "b", "prompt": "P", "choices": [" a"], "label": 0}, 2, "choices", "at least 2"),
        ({"id": "b", "prompt": "P", "choices": [" a", 3], "label": 0}, 2, "choices[1]", "non-empty string"),
        ({"id": "b", "prompt": "P", "choices": [" a", " a"], "label": 0}, 2, "choices", "are both ' a'"),
        ({"id": "b", "prompt": "P", "choices": [" a", " b"], "label": 2}, 2, "label", "out of range"),
        ({"id": "b", "prompt": "P", "choices": [" a", " b"], "label": True}, 2, "label", "integer index"),
        ({"id": "b", "prompt": "P", "choices": [" a", " b"]}, 2, "label", "exactly one of"),
        ({"id": "b", "prompt": "P", "choices": [" a", " b"], "label": 0, "labels": [1, 0]}, 2, "label", "exactly one of"),
        ({"id": "b", "prompt": "P", "choices": [" a", " b"], "labels": [1]}, 2, "labels", "one per choice"),
        ({"id": "b", "prompt": "P", "choices": [" a", " b"], "labels": [2, 0]}, 2, "labels", "0 or 1"),
        ({"id": "b", "prompt": "P", "choices": [" a", " b"], "labels": [0, 0]}, 2, "labels", "at least one"),
        ({"id": "a", "prompt": "P", "choices": [" a", " b"], "label": 0}, 2, "id", "duplicate id 'a' (first on line 1)"),
        ({"id": None, "prompt": "P", "choices": [" a", " b"], "label": 0}, 2, "id", "non-empty string or an integer"),
    ],
)
def test_mc_errors_name_line_and_field(tmp_path, bad, lineno, field, message):
    p = _file(tmp_path, [{"id": "a", "prompt": "P", "choices": [" a", " b"], "label": 0}, bad])
    with pytest.raises(JSONLFormatError) as err:
        load_jsonl_mc(p)
    text = str(err.value)
    assert f"{p}:{lineno}" in text and message in text
    if field:
        assert f"field {field!r}" in text
    assert err.value.lineno == lineno and err.value.field == field


def test_gen_errors(tmp_path):
    p = _file(tmp_path, [{"id": "a", "prompt": "P"}])
    with pytest.raises(JSONLFormatError, match=r":1: field 'answer': missing"):
        load_jsonl_gen(p)
    p = _file(tmp_path, [{"id": "a", "prompt": "P", "answer": 3}])
    with pytest.raises(JSONLFormatError, match=r":1: field 'answer': must be a string"):
        load_jsonl_train(p)
    p = _file(tmp_path, [{"id": "a", "prompt": "P", "answer": "x", "negatives": "y"}])
    with pytest.raises(JSONLFormatError, match=r"field 'negatives': must be a list"):
        load_jsonl_gen(p)
    with pytest.raises(FileNotFoundError):
        load_jsonl_mc(tmp_path / "missing.jsonl")


def test_roundtrip(tmp_path):
    src = _file(tmp_path, [{"id": "q", "prompt": "P", "choices": [" a", " b"], "labels": [0, 1]}])
    items = load_jsonl_mc(src)
    out = tmp_path / "out.jsonl"
    write_jsonl(out, items)
    assert load_jsonl_mc(out)[0].to_dict() == {**items[0].to_dict(), "source": "task"}
    gsrc = _file(tmp_path, [{"id": "g", "prompt": "P", "answer": " a", "negatives": [" b"]}], "g.jsonl")
    write_jsonl(out, load_jsonl_gen(gsrc))
    assert load_jsonl_gen(out)[0].negatives == [" b"]


def test_every_error_of_a_file_is_reported_at_once(tmp_path):
    good = {"prompt": "P", "choices": [" a", " b"], "label": 0}
    p = _file(tmp_path, [good, "{not json", good, {"prompt": "P", "choices": [" a", " a"], "label": 0},
                         {"prompt": "P", "choices": [" a", "   "], "label": 0}, good])
    with pytest.raises(JSONLFormatError) as err:
        load_jsonl_mc(p)
    found = [(e.lineno, e.field) for e in err.value.errors]
    assert found == [(2, None), (4, "choices"), (5, "choices[1]")]
    text = str(err.value)
    assert "3 format errors" in text and f"{p}:2" in text and f"{p}:4: field 'choices'" in text
    assert f"{p}:5: field 'choices[1]'" in text


def test_reported_errors_are_capped(tmp_path):
    from svd_ray.data.jsonl import MAX_REPORTED

    p = _file(tmp_path, ["{bad"] * (MAX_REPORTED + 7))
    with pytest.raises(JSONLFormatError) as err:
        load_jsonl_mc(p)
    assert len(err.value.errors) == MAX_REPORTED + 7
    assert "... and 7 more" in str(err.value) and str(err.value).count(": invalid JSON") == MAX_REPORTED


def test_duplicate_choices_merge_when_labels_agree(tmp_path):
    p = _file(tmp_path, [{"prompt": "P", "choices": [" a", " b", " a", " c"], "labels": [1, 0, 1, 0]},
                         {"prompt": "P", "choices": [" a", " b", " b"], "label": 0}])
    items = load_jsonl_mc(p, duplicates="merge")
    assert [(i.choices, i.labels) for i in items] == [([" a", " b", " c"], [1, 0, 0]), ([" a", " b"], [1, 0])]
    bad = _file(tmp_path, [{"prompt": "P", "choices": [" a", " b", " a"], "labels": [1, 0, 0]}], "bad.jsonl")
    with pytest.raises(JSONLFormatError, match="one is marked correct and one is not"):
        load_jsonl_mc(bad, duplicates="merge")
