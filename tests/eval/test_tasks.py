"""Task readers: the first items of the real shared/data files (skipped where absent), prompt
formats, gold labels and counts, and clear errors for missing or malformed files."""
import json
import os

import pytest

from marjax.errors import DataError, MarjaxError
from marjax.eval import tasks as T



@pytest.fixture
def DATA(shared_data):
    return str(shared_data)


def test_piqa_real(DATA):
    items = T.load_task("piqa", DATA)
    assert len(items) == 200
    assert [it.gold for it in items[:3]] == [0, 1, 1]
    assert sum(it.gold for it in items) == 105  # the .lst file's sum
    it = items[0]
    assert it.contexts == ("Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",) * 2
    assert it.continuations[0].startswith(" Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper")
    assert it.choices[1] == it.continuations[1][1:]
    assert items[1].choices == ("replace drawer with bobby pin ", "finish, woodgrain with  bobby pin ")


def test_hellaswag_real(DATA):
    items = T.load_task("hellaswag", DATA)
    assert len(items) == 200
    assert [it.gold for it in items[:2]] == [3, 3]
    counts = [sum(it.gold == g for it in items) for g in range(4)]
    assert counts == [53, 47, 58, 42]
    it = items[0]
    assert it.contexts[0] == "Roof shingle removal: A man is sitting on a roof. he"
    assert it.continuations == (" is using wrap to wrap a pair of skis.", " is ripping level tiles off.",
                                " is holding a rubik's cube.", " starts pulling up roofing on a roof.")
    assert items[1].contexts[0].startswith("Clean and jerk: A lady walks to a barbell.")
    assert items[-1].continuations[-1].endswith("slowly to cut the lawn.")


@pytest.mark.parametrize("name,n,first,gold_sum", [
    ("arc_easy", 200, [0, 1, 3, 3, 1, 2], 284), ("arc_challenge", 200, [2, 1, 2, 3, 3, 1], 282),
    ("openbookqa", 100, [1, 0, 2, 2, 2, 2], 134), ("boolq", 200, [0, 1, 1, 1, 1, 0], 127),
    ("winogrande", 200, [1, 0, 1, 0, 0, 0], 105)])
def test_llm_foundry_real(DATA, name, n, first, gold_sum):
    items = T.load_task(name, DATA)
    assert len(items) == n
    assert [it.gold for it in items[:6]] == first and sum(it.gold for it in items) == gold_sum
    assert all(c.startswith(" ") for it in items for c in it.continuations)


def test_prompt_formats_real(DATA):
    arc = T.load_task("arc_easy", DATA, limit=94)
    assert arc[0].contexts[0] == ("Question: Which statement best explains why photosynthesis is the "
                                  "foundation of most food webs?\nAnswer:")
    assert arc[0].continuations[0] == " Sunlight is the source of energy for nearly all ecosystems."
    assert arc[93].choices == ("decrease", "decrease", "increase", "remain the same")  # padded 3-option item
    obqa = T.load_task("openbookqa", DATA, limit=2)
    assert obqa[1].contexts[0] == "There is most likely going to be fog around:"
    assert obqa[1].continuations == (" a marsh", " a tundra", " the plains", " a desert")
    boolq = T.load_task("boolq", DATA, limit=1)[0]
    assert boolq.contexts[0].startswith("Passage: All biomass goes through") and boolq.contexts[0].endswith("?\nAnswer:")
    assert boolq.continuations == (" no", " yes")
    wg = T.load_task("winogrande", DATA, limit=1)[0]
    assert wg.contexts == ("Sarah was a much better surgeon than Maria so Sarah",
                           "Sarah was a much better surgeon than Maria so Maria")
    assert wg.continuations == (" always got the easier cases.",) * 2 and wg.gold == 1


def test_lambada_real(DATA):
    items = T.load_task("lambada", DATA)
    assert len(items) == 200
    assert items[0].continuation == " signs" and items[1].continuation == " Shane"
    assert items[0].context.endswith("I don't care about") and items[0].context.startswith("In my palm")


def test_limit(DATA):
    assert len(T.load_task("hellaswag", DATA, limit=7)) == 7
    assert len(T.load_task("piqa", DATA, limit=3)) == 3
    with pytest.raises(MarjaxError, match="limit"):
        T.load_task("piqa", DATA, limit=0)


def test_mc_requests_layout():
    items = [T.MCItem(("a", "b"), (" x", " y"), 0, ("x", "y")), T.MCItem(("c",) * 3, (" 1", " 2", " 3"), 2, ("1", "2", "3"))]
    assert T.mc_requests(items) == [("a", " x"), ("b", " y"), ("c", " 1"), ("c", " 2"), ("c", " 3")]


def test_missing_file_names_expected_path(tmp_path):
    with pytest.raises(DataError) as e:
        T.load_task("piqa", str(tmp_path))
    assert os.path.join(str(tmp_path), "piqa", "valid.jsonl") in str(e.value)
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n')
    with pytest.raises(DataError, match="valid-labels.lst"):
        T.load_task("piqa", str(tmp_path))


def test_unknown_task_lists_known(tmp_path):
    with pytest.raises(MarjaxError, match="known tasks: ppl, piqa, hellaswag"):
        T.load_task("mmlu", str(tmp_path))


def _write(tmp_path, rel, text):
    p = tmp_path / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def test_malformed_files(tmp_path):
    _write(tmp_path, "arc_easy/arc_easy.jsonl",
           json.dumps({"query": "Question: q", "choices": ["a", "b"], "gold": 1}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"arc_easy.jsonl:2: bad JSON"):
        T.load_task("arc_easy", str(tmp_path))
    assert T.load_task("arc_easy", str(tmp_path), limit=1)[0].gold == 1
    _write(tmp_path, "boolq/boolq.jsonl", json.dumps({"query": "q", "choices": ["no", "yes"], "gold": 2}) + "\n")
    with pytest.raises(DataError, match=r"boolq.jsonl:1: gold label must be in 0..1, got 2"):
        T.load_task("boolq", str(tmp_path))
    _write(tmp_path, "openbookqa/openbook_qa.jsonl", json.dumps({"query": "q", "gold": 0}) + "\n")
    with pytest.raises(DataError, match="missing key 'choices'"):
        T.load_task("openbookqa", str(tmp_path))
    _write(tmp_path, "hellaswag/hellaswag_val_full.txt", "ctx\n1\na\nb\nc\n")
    with pytest.raises(DataError, match="not a multiple of 6"):
        T.load_task("hellaswag", str(tmp_path))
    _write(tmp_path, "hellaswag/hellaswag_val_full.txt", "ctx\n7\na\nb\nc\nd\n")
    with pytest.raises(DataError, match=r"hellaswag_val_full.txt:2: gold line must be 0-3"):
        T.load_task("hellaswag", str(tmp_path))
    _write(tmp_path, "piqa/valid.jsonl", '{"goal": "g", "sol1": "a", "sol2": "b"}\n')
    _write(tmp_path, "piqa/valid-labels.lst", "2\n")
    with pytest.raises(DataError, match=r"valid-labels.lst:1: label must be 0 or 1"):
        T.load_task("piqa", str(tmp_path))
