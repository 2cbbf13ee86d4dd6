"""Document input: every format, the auto rule, every error, token budgets, default prompts."""

from __future__ import annotations

import json

import pytest

from actlab.datasets import default_prompts
from actlab.errors import ActlabError
from actlab.io import budget, detect_format, iter_documents, read_documents, token_counter


def write(tmp_path, name, content):
    p = tmp_path / name
    if isinstance(content, str):
        p.write_text(content, encoding="utf-8", newline="")
    else:
        p.write_bytes(content)
    return p


# ---------------------------------------------------------------- plain text
def test_lines_one_document_per_line(tmp_path):
    p = write(tmp_path, "a.txt", "\ufefffirst line  \r\nsecond line\n\n   \n  indented third\n")
    assert detect_format(p) == "paragraphs"  # an interior blank line
    assert read_documents(p, fmt="lines") == ["first line", "second line", "  indented third"]
    q = write(tmp_path, "b.txt", "one\ntwo\r\nthree\n\n\n")  # trailing blank lines only
    assert detect_format(q) == "lines"
    assert read_documents(q) == ["one", "two", "three"]
    r = write(tmp_path, "c.txt", "no newline at end")
    assert read_documents(r) == ["no newline at end"]


def test_paragraphs_split_on_blank_lines(tmp_path):
    p = write(tmp_path, "p.md", "\n\nTitle line\nsecond line of it\n\n\n  \nNext para\n  kept indent\n\nLast\n")
    assert detect_format(p) == "paragraphs"
    assert read_documents(p) == ["Title line\nsecond line of it", "Next para\n  kept indent", "Last"]
    # an explicit format overrides the auto rule
    assert read_documents(p, fmt="lines")[:2] == ["Title line", "second line of it"]


# ---------------------------------------------------------------- JSONL / JSON
def test_jsonl_text_field(tmp_path):
    rows = [{"text": "alpha", "id": 1}, {"text": "beta"}, "a bare string", {"text": "  "}]
    p = write(tmp_path, "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert detect_format(p) == "jsonl"
    assert read_documents(p) == ["alpha", "beta", "a bare string"]  # empty text skipped
    q = write(tmp_path, "e.ndjson", '{"content": "x1"}\n{"content": "x2"}\n')
    assert read_documents(q, text_field="content") == ["x1", "x2"]


def test_jsonl_errors_name_the_line(tmp_path):
    p = write(tmp_path, "bad.jsonl", '{"text": "ok"}\n{"text": "oops"\n')
    with pytest.raises(ActlabError, match=r"bad\.jsonl line 2: invalid JSON"):
        read_documents(p)
    q = write(tmp_path, "nofield.jsonl", '{"text": "ok"}\n\n{"body": "x", "id": 3}\n')
    with pytest.raises(ActlabError, match=r"line 3: .*no 'text' field \(keys: 'body', 'id'\); pass text_field='body'"):
        read_documents(q)
    r = write(tmp_path, "nonstr.jsonl", '{"text": 5}\n')
    with pytest.raises(ActlabError, match=r"line 1: field 'text' must be a string"):
        read_documents(r)
    s = write(tmp_path, "arr.jsonl", "[1, 2, 3]\n")
    with pytest.raises(ActlabError, match="fmt='tokens'"):
        read_documents(s)
    t = write(tmp_path, "num.jsonl", "12\n")
    with pytest.raises(ActlabError, match="line 1: expected a JSON object"):
        read_documents(t)


def test_json_file_variants(tmp_path):
    assert read_documents(write(tmp_path, "a.json", '["x", "y"]')) == ["x", "y"]
    assert read_documents(write(tmp_path, "b.json", '[{"text": "x"}, {"text": ""}]')) == ["x"]
    assert read_documents(write(tmp_path, "c.tokens.json", "[[1, 2], [], [3]]")) == [[1, 2], [3]]
    assert read_documents(write(tmp_path, "d.json", '{"documents": ["x"]}')) == ["x"]
    with pytest.raises(ActlabError, match=r"e\.json line 3: invalid JSON"):
        read_documents(write(tmp_path, "e.json", '[\n "x",\n "y" "z"\n]'))
    with pytest.raises(ActlabError, match="expected a JSON array"):
        read_documents(write(tmp_path, "f.json", '{"a": 1}'))
    with pytest.raises(ActlabError, match="item 1"):
        read_documents(write(tmp_path, "g.json", '[[1, 2], [1, -2]]'))


# ---------------------------------------------------------------- token ids
def test_token_files(tmp_path):
    p = write(tmp_path, "a.ids", "1 2 3\n\n4,5, 6\n[7, 8]\n")
    assert detect_format(p) == "tokens"
    assert read_documents(p) == [[1, 2, 3], [4, 5, 6], [7, 8]]
    q = write(tmp_path, "b.tokens.jsonl", "[10, 11]\n[12]\n[]\n")
    assert detect_format(q) == "tokens"
    assert read_documents(q) == [[10, 11], [12]]
    r = write(tmp_path, "c.txt", "5 6 7\n")
    assert read_documents(r, fmt="tokens") == [[5, 6, 7]]


@pytest.mark.parametrize(
    "content,pattern",
    [
        ("1 2 x3\n", r"line 1: 'x3' is not an integer"),
        ("1 2\n3 -4\n", r"line 2: token ids must be non-negative"),
        ("[1, 2.5]\n", r"line 1: expected a list of non-negative integer"),
        ("[1, true]\n", r"line 1: expected a list of non-negative integer"),
        ("[1, 2\n", r"line 1: invalid JSON"),
    ],
)
def test_token_file_errors(tmp_path, content, pattern):
    with pytest.raises(ActlabError, match=pattern):
        read_documents(write(tmp_path, "t.ids", content))


# ---------------------------------------------------------------- file errors
def test_missing_directory_empty_and_blank_files(tmp_path):
    with pytest.raises(ActlabError, match="not found"):
        read_documents(tmp_path / "absent.txt")
    with pytest.raises(ActlabError, match="is a directory"):
        read_documents(tmp_path)
    with pytest.raises(ActlabError, match="is empty"):
        read_documents(write(tmp_path, "empty.txt", ""))
    with pytest.raises(ActlabError, match="contains no documents"):
        read_documents(write(tmp_path, "blank.txt", "\n  \n\t\n"))
    with pytest.raises(ActlabError, match="contains no documents"):
        read_documents(write(tmp_path, "blank.jsonl", '{"text": ""}\n'))
    with pytest.raises(ActlabError, match="unknown document format 'csv'"):
        read_documents(write(tmp_path, "x.txt", "a"), fmt="csv")
    with pytest.raises(ActlabError, match="text_field"):
        read_documents(write(tmp_path, "y.jsonl", "{}"), text_field="")


def test_non_utf8_names_offset_line_and_fix(tmp_path):
    p = write(tmp_path, "latin.txt", "good line\ncaf".encode() + b"\xe9 au lait\n")
    with pytest.raises(ActlabError) as e:
        read_documents(p)
    msg = str(e.value)
    assert "not valid UTF-8" in msg and "0xe9" in msg
    assert "byte offset 13" in msg and "line 2" in msg
    assert "iconv" in msg
    q = write(tmp_path, "bom.jsonl", b'\xef\xbb\xbf{"text": "x"}\n{"text": "\xff"}\n')
    with pytest.raises(ActlabError, match=r"byte 0xff at byte offset 27 \(line 2, byte 11 "):
        read_documents(q)


def test_binary_file_is_rejected(tmp_path):
    with pytest.raises(ActlabError, match="binary file"):
        read_documents(write(tmp_path, "model.txt", b"abc\x00\x01\x02"))


def test_iter_documents_is_lazy(tmp_path):
    lines = [f"doc {i}" for i in range(5)]
    p = write(tmp_path, "big.txt", ("\n".join(lines) + "\n").encode() + b"bad \xff\n")
    it = iter_documents(p, fmt="lines")
    assert [next(it) for _ in range(5)] == lines  # yielded before the bad line is reached
    with pytest.raises(ActlabError, match="line 6"):
        next(it)


# ---------------------------------------------------------------- budget
def words(text: str) -> int:
    return len(text.split())


def test_budget_with_count_function_truncates_last_doc():
    docs = ["a b c", "d e", "f g h i j", "k"]
    assert budget(docs, words, 100) == docs
    assert budget(docs, words, 5) == ["a b c", "d e"]
    out = budget(docs, words, 7)
    assert out[:2] == ["a b c", "d e"] and words(out[2]) == 2 and out[2].startswith("f g")
    assert budget(docs, words, 1) == ["a"]
    assert budget(iter(docs), words, 3) == ["a b c"]  # lazy input is fine


def test_budget_token_documents_need_no_tokenizer():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    assert budget(docs, None, 7) == [[1, 2, 3], [4, 5], [6, 7]]
    assert budget(docs, None, 3) == [[1, 2, 3]]
    assert docs == [[1, 2, 3], [4, 5], [6, 7, 8, 9]]  # input untouched


def test_budget_with_real_tokenizers():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[BOS]": 1, **{w: i + 2 for i, w in enumerate("the cat sat on mat a dog".split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    docs = ["the cat sat on the mat", "a dog sat", "the dog"]
    # raw tokenizers.Tokenizer: with BOS each doc costs words + 1
    assert budget(docs, tok, 11) == docs[:2]
    cut = budget(docs, tok, 9)
    assert cut[0] == docs[0] and cut[1] == "a"  # 7 + ([BOS] a) = 9
    assert budget(docs, tok, 6, add_special_tokens=False) == ["the cat sat on the mat"]
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", unk_token="[UNK]")
    assert budget(docs, hf, 9) == cut
    assert token_counter(hf)("a dog") == 3


def test_budget_errors():
    with pytest.raises(ActlabError, match="max_tokens"):
        budget(["a"], words, 0)
    with pytest.raises(ActlabError, match="tokenizer"):
        budget(["a"], 42, 10)
    with pytest.raises(ActlabError, match="non-negative int"):
        budget(["a"], lambda t: "3", 10)
    with pytest.raises(ActlabError, match="strings or lists"):
        budget([3.5], words, 10)


# ---------------------------------------------------------------- default prompts
def test_default_prompts():
    prompts = default_prompts()
    assert 280 <= len(prompts) <= 400
    assert len(set(prompts)) == len(prompts)
    assert all(p and p == p.strip() and p.isascii() and len(p) < 200 for p in prompts)
    assert sum(p.endswith("?") for p in prompts) >= 30  # questions
    assert any("def " in p for p in prompts) and any("(noun)" in p for p in prompts)
    assert default_prompts() is not prompts  # a fresh list each call
