import json
import shutil
from pathlib import Path

import pytest

from eep_hpc.model.tiny import ensure_tiny_checkpoint
from eep_hpc.model.tokenizer import IncrementalDetokenizer, Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello, world! The quick brown fox, 1234.5 and 42%.",
    "中文测试：你好，世界。",
    "emoji 😀🎉👍🏽 and flags 🇫🇷 mixed with text",
    "Grüße aus Köln — naïve café, ½ ≠ ¾",
    "  leading spaces\n\ttabs and\r\nnewlines  ",
    "<|im_start|>user\nspecial tokens inline<|im_end|>",
]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Wetter für einen Ort — returns °C",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 6 x 7?"},
        {"role": "assistant", "content": "42."},
        {"role": "user", "content": "你好 😀"},
    ],
    [{"role": "user", "content": [{"type": "text", "text": "part one, "}, {"type": "text", "text": "part two"}]}],
    [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "18 °C"},
    ],
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return ensure_tiny_checkpoint(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def tokenizer(tiny_dir) -> Tokenizer:
    return Tokenizer.from_dir(tiny_dir)


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_dir):
    return transformers.AutoTokenizer.from_pretrained(tiny_dir)


def model_dir_with(tiny_dir: Path, tmp_path: Path, **files: dict) -> Path:
    """A copy of the tiny tokenizer with the given JSON files (tokenizer_config: the tiny one unless given)."""
    tmp_path.mkdir(exist_ok=True)
    shutil.copy(tiny_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    files.setdefault("tokenizer_config", config)
    for name, content in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(content))
    return tmp_path


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_and_decode_match_transformers(tokenizer, hf_tokenizer, text, add_special_tokens):
    ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    assert ids == hf_tokenizer.encode(text, add_special_tokens=add_special_tokens)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    for skip in (True, False):
        assert tokenizer.decode(ids, skip_special_tokens=skip) == hf_tokenizer.decode(ids, skip_special_tokens=skip)


def test_vocab_and_special_tokens(tokenizer, hf_tokenizer):
    assert tokenizer.vocab_size == len(hf_tokenizer) == 512
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.bos_token is None
    assert tokenizer.decode(tokenizer.encode("a<|im_end|>b")) == "ab"


def test_eos_ids_are_the_union_of_all_configs(tiny_dir, tmp_path):
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    path = model_dir_with(
        tiny_dir,
        tmp_path,
        tokenizer_config={**config, "eos_token": {"content": "<|endoftext|>", "special": True}},
        generation_config={"eos_token_id": [2, 0]},
        config={"eos_token_id": 1},
    )
    assert Tokenizer.from_dir(path).eos_token_ids == [0, 2, 1]
    path = model_dir_with(tiny_dir, tmp_path / "only_tokenizer_config")
    assert Tokenizer.from_dir(path).eos_token_ids == [2]


def test_add_bos_token_without_post_processor(tiny_dir, tmp_path):
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    config |= {"bos_token": "<|endoftext|>", "add_bos_token": True}
    path = model_dir_with(tiny_dir, tmp_path, tokenizer_config=config)
    tokenizer = Tokenizer.from_dir(path)
    assert tokenizer.encode("hi")[0] == 0 and tokenizer.encode("hi", add_special_tokens=False)[0] != 0
    assert tokenizer.encode("<|endoftext|>hi").count(0) == 1  # never a second BOS


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tokenizer, hf_tokenizer, conversation, add_generation_prompt):
    for tools in (None, TOOLS):
        ours = tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tools=tools)
        theirs = hf_tokenizer.apply_chat_template(
            conversation, add_generation_prompt=add_generation_prompt, tools=tools, tokenize=False
        )
        assert ours == theirs
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt
    assert "Wetter für einen Ort — returns °C" in ours  # tojson keeps non-ASCII text


def write_template(tiny_dir: Path, tmp_path: Path, template) -> Tokenizer:
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    return Tokenizer.from_dir(model_dir_with(tiny_dir, tmp_path, tokenizer_config=config))


def test_template_features_transformers_provides(tiny_dir, tmp_path):
    template = (
        "{{ bos_token is defined }}|{{ eos_token }}|{{ pad_token }}|{{ messages | tojson(indent=1) }}|"
        "{{ strftime_now('%Y') | length }}|{{ extra }}"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}"
        "{% generation %}G{% endgeneration %}"
    )
    messages = [{"role": "user", "content": "é<"}, {"role": "assistant", "content": "x"}]
    rendered = write_template(tiny_dir, tmp_path, template).apply_chat_template(messages, extra="kw")
    messages_json = json.dumps(messages, indent=1, ensure_ascii=False)
    assert rendered == f"False|<|im_end|>|<|endoftext|>|{messages_json}|4|kwuserG"


def test_named_templates_use_default(tiny_dir, tmp_path):
    tokenizer = write_template(
        tiny_dir, tmp_path, [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    )
    assert tokenizer.apply_chat_template([{"role": "user", "content": "x"}]) == "D"


@pytest.mark.parametrize(
    "template, message",
    [
        (None, "model has no chat template"),
        ("{{ raise_exception('only user and assistant roles') }}", "only user and assistant roles"),
        ("{% for m in messages %}", "chat template error"),  # syntax error
        ("{{ messages[0].content + 1 }}", "chat template error"),  # type error while rendering
        ("{{ ''.__class__.__mro__ }}", "chat template error"),  # sandbox
    ],
)
def test_template_errors_are_value_errors(tiny_dir, tmp_path, template, message):
    tokenizer = write_template(tiny_dir, tmp_path, template)
    with pytest.raises(ValueError, match=message):
        tokenizer.apply_chat_template([{"role": "user", "content": "x"}])


def stream(detokenizer: IncrementalDetokenizer, ids: list[int], chunk: int) -> list[str]:
    pieces = [detokenizer.add(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    return pieces + [detokenizer.flush()]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_incremental_detokenizer_joins_to_decode(tokenizer, text, chunk):
    ids = tokenizer.encode(text)
    prompt = tokenizer.encode("prompt: 你")
    for skip in (True, False):
        pieces = stream(IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip), ids, chunk)
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in piece for piece in pieces)  # never half a character


def test_incremental_detokenizer_holds_back_partial_characters(tokenizer):
    ids = tokenizer.encode("😀")
    assert len(ids) > 1  # four bytes, several byte-level tokens
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert [detokenizer.add([i]) for i in ids] == [""] * (len(ids) - 1) + ["😀"]


def test_incremental_detokenizer_flushes_a_truncated_character(tokenizer):
    ids = tokenizer.encode("ab😀")
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.add([i]) for i in ids[:-1]]
    pieces.append(detokenizer.flush())
    assert "".join(pieces) == tokenizer.decode(ids[:-1]) and pieces[-1].endswith("\ufffd")


def test_incremental_detokenizer_decodes_a_bounded_window(tokenizer, monkeypatch):
    ids = tokenizer.encode(" ".join(TEXTS) * 4)
    decoded_lengths = []
    decode = tokenizer.decode
    monkeypatch.setattr(tokenizer, "decode", lambda i, **kw: decoded_lengths.append(len(i)) or decode(i, **kw))
    pieces = stream(IncrementalDetokenizer(tokenizer), ids, 1)
    monkeypatch.undo()
    assert "".join(pieces) == tokenizer.decode(ids)
    assert len(ids) > 200 and max(decoded_lengths) <= 10
