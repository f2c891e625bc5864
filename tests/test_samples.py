"""Prompt/response sample files: plain and chat rows, JSONL and Parquet, the prompt/response token boundary, and
bad rows refused with their file and line."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from emojax.corpus.samples import read_samples
from emojax.errors import InputError
from emojax.tokenizer import ByteTokenizer


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_plain_and_chat_rows_give_prompt_and_response_tokens(tmp_path):
    chat = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there."}]
    f = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "Q: 2+2?", "response": " 4"},
                                          {"id": "c1", "messages": chat}])
    plain, chatted = read_samples([f])
    assert (plain.sample_id, chatted.sample_id) == ("a.jsonl:1", "c1")
    tok = ByteTokenizer()
    ids, n = plain.token_ids(tok)
    assert tok.decode(ids[:n]) == "Q: 2+2?" and tok.decode(ids[n:]) == " 4"
    ids, n = chatted.token_ids(tok)
    assert tok.decode(ids[:n]) == "Be kind.\n\nHuman: Hi\n\nAssistant:"
    assert tok.decode(ids[n:]) == " Hello there."


def test_parquet_rows_read_like_jsonl(tmp_path):
    pq.write_table(pa.table({"prompt": ["a", "b"], "response": ["x", "y"]}), tmp_path / "s.parquet")
    samples = read_samples([tmp_path / "s.parquet"])
    assert [(s.sample_id, s.prompt, s.response) for s in samples] == [("s.parquet:1", "a", "x"),
                                                                       ("s.parquet:2", "b", "y")]


@pytest.mark.parametrize("row, message", [
    ('{"prompt": "a"}', "needs 'prompt' and 'response', or 'messages'"),
    ('{"prompt": "a", "response": 3}', "'response' must be text"),
    ('{"prompt": "a", "response": "  "}', "the response is empty"),
    ('{"messages": [{"role": "user", "content": "a"}]}', "must be the assistant's response"),
    ('{"messages": [{"role": "assistant", "content": "a"}]}', "a prompt turn must come before it"),
    ('{"messages": [{"role": "bot", "content": "a"}, {"role": "assistant", "content": "b"}]}', "messages[0]"),
    ("not json", "not JSON"),
])
def test_a_bad_row_is_refused_naming_file_and_line(tmp_path, row, message):
    f = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "response": "fine"}, row])
    with pytest.raises(InputError) as e:
        read_samples([f])
    assert f"{f}, line 2" in str(e.value) and message in str(e.value)


def test_a_repeated_id_across_files_is_refused(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": "x", "prompt": "p", "response": "r"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": "x", "prompt": "p", "response": "r"}])
    with pytest.raises(InputError, match=r"b.jsonl, line 1: id 'x' repeats .*a.jsonl, line 1"):
        read_samples([a, b])


def test_missing_or_empty_input_is_an_error(tmp_path):
    with pytest.raises(InputError, match="cannot read the sample file"):
        read_samples([tmp_path / "absent.jsonl"])
    with pytest.raises(InputError, match="no samples"):
        read_samples([write_jsonl(tmp_path / "empty.jsonl", [])])
