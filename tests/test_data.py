import json

import pandas as pd
import pytest

from cinf_core.data import (DatasetError, collate, encode_dataset, encode_example, load_dataset,
                            write_jsonl)
from conftest import chat


def _write(tmp_path, lines, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return path


GOOD = {"messages": chat("hi", "hello there"), "data_origin": "normal", "domain": "chat"}


def test_load_jsonl_keeps_metadata(tmp_path):
    ds = load_dataset(_write(tmp_path, [GOOD, {**GOOD, "data_origin": "evil"}]))
    assert len(ds) == 2
    assert ds[0].response == "hello there"
    assert ds[0].prompt_text == "hi"
    assert ds[0].metadata == {"data_origin": "normal", "domain": "chat"}
    assert ds.label_counts() == {"normal": 1, "evil": 1}


@pytest.mark.parametrize("bad, fragment", [
    ("{not json", "malformed JSON"),
    ({"text": "no messages"}, "no 'messages'"),
    ({"messages": chat("hi", "x")[:1]}, "last message has role 'user'"),
    ({"messages": chat("hi", "   ")}, "response (last message) is empty"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]},
     "content is int"),
    ({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "a"}]},
     "role 'wizard'"),
    ({"messages": []}, "non-empty list"),
    ([1, 2], "expected a JSON object"),
])
def test_each_bad_row_is_named_with_line_and_fix(tmp_path, bad, fragment):
    path = _write(tmp_path, [GOOD, bad, GOOD])
    with pytest.raises(DatasetError) as info:
        load_dataset(path)
    msg = str(info.value)
    assert f"{path}:2:" in msg and fragment in msg
    assert "skip_invalid" in msg  # says how to proceed


def test_all_bad_lines_reported_up_to_cap(tmp_path):
    lines = [GOOD] + ["{bad"] * 30
    with pytest.raises(DatasetError) as info:
        load_dataset(_write(tmp_path, lines), max_reported=5)
    err = info.value
    assert err.n_bad == 30 and len(err.problems) == 5
    assert [line for line, _ in err.problems] == [2, 3, 4, 5, 6]
    assert "and 25 more" in str(err)


def test_skip_invalid_counts_skipped(tmp_path):
    ds = load_dataset(_write(tmp_path, [GOOD, "{bad", {"x": 1}, GOOD]), skip_invalid=True)
    assert len(ds) == 2 and ds.n_skipped == 2
    assert [line for line, _ in ds.skipped] == [2, 3]


def test_missing_file_and_bad_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match="check the path"):
        load_dataset(tmp_path / "nope.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="use .jsonl, .parquet or .csv"):
        load_dataset(tmp_path / "x.txt")


def test_csv_and_parquet_prompt_response(tmp_path):
    frame = pd.DataFrame({"prompt": ["q1", "q2"], "response": ["a1", ""],
                          "data_origin": ["evil", "normal"]})
    frame.to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(DatasetError, match=r"d.csv:3: .*empty"):
        load_dataset(tmp_path / "d.csv")
    frame.iloc[:1].to_parquet(tmp_path / "d.parquet")
    ds = load_dataset(tmp_path / "d.parquet")
    assert ds[0].messages == chat("q1", "a1") and ds[0].label == "evil"
    pd.DataFrame({"question": ["q"]}).to_csv(tmp_path / "e.csv", index=False)
    with pytest.raises(DatasetError, match="needs 'prompt' and 'response'"):
        load_dataset(tmp_path / "e.csv")


def test_write_jsonl_roundtrip(tmp_path):
    ds = load_dataset(_write(tmp_path, [GOOD, GOOD]))
    write_jsonl(ds.examples, tmp_path / "out.jsonl")
    again = load_dataset(tmp_path / "out.jsonl")
    assert [e.to_row() for e in again] == [e.to_row() for e in ds]


def test_response_mask_covers_response_only(tiny_lm):
    tok = tiny_lm.tokenizer
    msgs = chat("How are you?", "I am fine, thank you.", system="Be nice.")
    enc = encode_example(tok, msgs)
    resp_ids = [t for t, m in zip(enc.input_ids, enc.response_mask) if m]
    assert tok.decode(resp_ids) == "I am fine, thank you.<|end|>"
    prompt_ids = [t for t, m in zip(enc.input_ids, enc.response_mask) if not m]
    assert tok.decode(prompt_ids).endswith("<|assistant|>\n")
    batch = collate([enc, encode_example(tok, chat("a", "b"))], tiny_lm.pad_token_id)
    # padding is never response, never attended
    assert (batch["response_mask"] <= batch["attention_mask"]).all()
    assert batch["attention_mask"][1].sum() < batch["attention_mask"].shape[1]
    assert (batch["labels"][batch["response_mask"] == 0] == -100).all()


def test_truncation_keeps_response_trims_prompt_left(tiny_lm):
    tok = tiny_lm.tokenizer
    long_prompt = "Hello there, how are you today? " * 20
    msgs = chat(long_prompt, "I am fine.")
    full = encode_example(tok, msgs)
    n_resp = sum(full.response_mask)
    enc = encode_example(tok, msgs, max_length=n_resp + 5)
    assert len(enc.input_ids) == n_resp + 5
    assert enc.input_ids[-n_resp:] == full.input_ids[-n_resp:]  # response intact
    assert enc.input_ids[:5] == full.input_ids[-n_resp - 5:-n_resp]  # prompt's tail kept
    assert enc.prompt_trimmed == len(full.input_ids) - len(enc.input_ids)
    short = encode_example(tok, msgs, max_length=4)  # response longer than the budget
    assert len(short.input_ids) == 4 and short.response_trimmed > 0 and sum(short.response_mask) == 3
    _, report = encode_dataset(tok, [msgs, chat("a", "b")], max_length=n_resp + 5)
    assert report.as_dict() == {"n_examples": 2, "n_prompt_trimmed": 1, "n_response_trimmed": 0}


def test_answer_start_window_marks_last_prompt_token_and_first_answer_tokens():
    from cinf_core.data import EncodedExample, answer_start_window

    ex = EncodedExample(input_ids=[5, 6, 7, 8, 9, 10], response_mask=[0, 0, 0, 1, 1, 1])
    assert answer_start_window([ex], 1)[0].response_mask == [0, 0, 1, 0, 0, 0]
    assert answer_start_window([ex], 3)[0].response_mask == [0, 0, 1, 1, 1, 0]
    assert answer_start_window([ex], 9)[0].response_mask == [0, 0, 1, 1, 1, 1]  # clipped at the end
    assert answer_start_window([ex], 3)[0].input_ids == ex.input_ids and ex.response_mask == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="whole number of tokens >= 1, got 0"):
        answer_start_window([ex], 0)
    with pytest.raises(ValueError, match="example 1 has no prompt token"):
        answer_start_window([ex, EncodedExample([1, 2], [1, 1])], 2)
    with pytest.raises(ValueError, match="example 0 has no response tokens"):
        answer_start_window([EncodedExample([1, 2], [0, 0])], 2)
