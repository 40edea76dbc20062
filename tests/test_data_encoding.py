"""User text files that are not UTF-8 (UTF-16 with a byte-order mark, binary, Latin-1) are refused
by every command that reads one, naming the file, what it is and how to convert it; nothing is
stored. A UTF-8 byte-order mark and U+2028 inside a JSON string are fine."""
import json

import pandas as pd
import pytest

from cinf_core.cli import main
from cinf_core.data import load_dataset, read_text
from cinf_core.store import Store
from conftest import chat, store_snapshot

ROWS = [{"messages": chat(f"question {i}?", f"answer {i}, café"), "data_origin": "normal"}
        for i in range(3)]
JSONL = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS)


def _error(argv, ws, capsys) -> str:
    before = store_snapshot(ws)
    assert main([*argv, "--workspace", str(ws)]) == 2
    error = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["error"]
    assert store_snapshot(ws) == before
    return error


@pytest.fixture
def ws(tmp_path, tiny_model_dir, capsys):
    ws = tmp_path / "ws"
    assert main(["add-model", str(tiny_model_dir), "--name", "tiny", "--workspace", str(ws)]) == 0
    capsys.readouterr()
    return ws


def test_utf16_files_are_named_with_the_conversion(tmp_path, ws, capsys):
    utf16 = tmp_path / "rows.jsonl"
    utf16.write_text(JSONL, encoding="utf-16")  # Python writes the byte-order mark first
    frame = pd.DataFrame({"prompt": ["q"], "response": ["a"]})
    csv16 = tmp_path / "rows.csv"
    csv16.write_bytes(frame.to_csv(index=False).encode("utf-16"))
    questions = tmp_path / "questions.txt"
    questions.write_text("What is evil?\nWhy?\n", encoding="utf-16")
    for argv, path in [
        (["add-dataset", str(utf16)], utf16),
        (["add-dataset", str(csv16)], csv16),
        (["add-queries", "--trait", "evil", "--model", "tiny", "--file", str(utf16)], utf16),
        (["add-queries", "--trait", "evil", "--model", "tiny", "--generate", "--questions",
          str(questions)], questions),
        (["add-concept", "--persona", "--trait", "evil", "--model", "tiny", "--layer", "1",
          "--trait-prompt", "Be evil.", "--neutral-prompt", "Be kind.", "--questions",
          str(questions)], questions),
    ]:
        error = _error(argv, ws, capsys)
        assert f"{path} is not UTF-8 text: it is UTF-16" in error, (argv, error)
        assert f"iconv -f UTF-16 -t UTF-8 {path} > {path.stem}.utf8{path.suffix}" in error


def test_binary_and_latin1_files_are_refused(tmp_path, ws, capsys):
    binary = tmp_path / "rows.jsonl"
    pd.DataFrame({"prompt": ["q"], "response": ["a"]}).to_parquet(binary)  # a Parquet file
    error = _error(["add-dataset", str(binary)], ws, capsys)
    assert f"{binary} is not UTF-8 text: it holds binary data (NUL bytes" in error
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(JSONL.encode("latin-1"))
    error = _error(["add-dataset", str(latin1)], ws, capsys)
    assert f"{latin1} is not UTF-8 text: byte 0xe9 on line 1" in error
    assert f"iconv -f LATIN1 -t UTF-8 {latin1}" in error


def test_utf8_with_a_byte_order_mark_and_line_separators_load(tmp_path):
    path = tmp_path / "bom.jsonl"
    rows = ROWS + [{"messages": chat("q", "one\u2028two")}]  # U+2028 raw inside a JSON string
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8-sig")
    ds = load_dataset(path)
    assert len(ds) == 4 and ds[3].response == "one\u2028two" and ds[0].response.endswith("café")
    assert read_text(path).startswith('{"messages"')
    Store(tmp_path / "ws").add_dataset("bom", ds)
