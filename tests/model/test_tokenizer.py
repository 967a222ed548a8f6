import itertools
import json
import random
import shutil
from pathlib import Path

import pytest
import tokenizers

from eep_hpc.model import tokenizer as tokenizer_module
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


# Both ways IncrementalDetokenizer works: tokenizers' DecodeStream and the Python window algorithm, on tokenizers of
# the kinds models ship, built offline: the tiny model's byte-level BPE, a SentencePiece-style BPE with byte
# fallback (Llama 2's decoder) whose CJK and emoji are byte tokens, and the placeholder word-level vocabulary.


def sentencepiece_tokenizer() -> Tokenizer:
    from tokenizers import decoders, models, normalizers, trainers

    from eep_hpc.model.tiny import CORPUS

    backend = tokenizers.Tokenizer(models.BPE(byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    backend.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    spec = json.loads(backend.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):  # SentencePiece's <0xNN> tokens, for what the vocabulary lacks
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    backend = tokenizers.Tokenizer.from_str(json.dumps(spec))
    return Tokenizer(backend, {"bos_token": "<s>", "eos_token": "</s>"}, [2], None)


def placeholder_tokenizer(tiny_dir: Path, tmp_path: Path) -> Tokenizer:
    from eep_hpc.model.placeholder_vocab import write_placeholder_tokenizer

    return Tokenizer.from_dir(write_placeholder_tokenizer(tiny_dir, tmp_path))


needs_decode_stream = pytest.mark.skipif(
    tokenizer_module.DecodeStream is None, reason="tokenizers without DecodeStream(ids=...)"
)


@pytest.fixture(scope="module")
def detok_tokenizers(tiny_dir, tmp_path_factory) -> dict[str, Tokenizer]:
    return {
        "byte-level": Tokenizer.from_dir(tiny_dir),
        "sentencepiece": sentencepiece_tokenizer(),
        "placeholder": placeholder_tokenizer(tiny_dir, tmp_path_factory.mktemp("placeholder")),
    }


def texts_of(kind: str) -> list[str]:
    if kind == "placeholder":
        return ["<t5> <t6> <t7>", "<t300>", "", "<t1> <t2> <t3> <t4> <t5> <t6> <t7> <t8>"]
    return [*TEXTS, "", "a", "<s>Hello</s> world <|im_end|>", "日本語のテキスト 🤖🤖 end", "x😀", " 😀"]


def detokenizer(tokenizer, prompt=None, skip=True, way="bytes") -> IncrementalDetokenizer:
    """An IncrementalDetokenizer that works one way: "bytes" (Tokenizer.token_bytes, byte-level BPE), "stream"
    (tokenizers' DecodeStream) or "window" (the Python window algorithm)."""
    if way == "window":
        d = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip, decode_stream=False)
        assert d._stream is None and d._bytes is None
        return d
    if way == "stream":  # as for a decoder other than ByteLevel alone
        saved = tokenizer.__dict__.pop("_token_bytes", None)
        tokenizer.__dict__["_token_bytes"] = {True: None, False: None}
        try:
            d = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip)
        finally:
            del tokenizer.__dict__["_token_bytes"]
            if saved is not None:
                tokenizer.__dict__["_token_bytes"] = saved
        assert d._stream is not None and d._bytes is None
        return d
    d = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip)
    assert d._bytes is not None and d._stream is None
    return d


def fast_ways(tokenizer) -> list[str]:
    return (["bytes"] if tokenizer.token_bytes() is not None else []) + ["stream"]


def both_ways(tokenizer, ids, chunk, prompt=None, skip=True, way="stream") -> tuple[list[str], list[str]]:
    """The deltas of `way` and of the window algorithm."""
    fast = detokenizer(tokenizer, prompt, skip, way)
    slow = detokenizer(tokenizer, prompt, skip, "window")
    return stream(fast, ids, chunk), stream(slow, ids, chunk)


@needs_decode_stream
@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece", "placeholder"])
@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_decode_stream_and_window_give_the_same_deltas(detok_tokenizers, kind, chunk):
    tokenizer = detok_tokenizers[kind]
    assert tokenizer.decodes_as_a_stream
    prompts = [None, tokenizer.encode("prompt: 你", add_special_tokens=False)] if kind != "placeholder" else [
        None, tokenizer.encode("<t9> <t10>")]
    for text, way in itertools.product(texts_of(kind), fast_ways(tokenizer)):
        ids = tokenizer.encode(text, add_special_tokens=False)
        for skip in (True, False):
            for prompt in prompts:
                fast, slow = both_ways(tokenizer, ids, chunk, prompt, skip, way)
                assert fast == slow, (text, skip, prompt, way)
                assert not any("\ufffd" in piece for piece in fast)  # never half a character
                # Joined, the deltas are what the output adds to the prompt context's text (without a prompt:
                # decode(output ids); a SentencePiece tokenizer strips a leading space only there).
                context = (prompt or [])[-IncrementalDetokenizer.PROMPT_CONTEXT :]
                context_text = tokenizer.decode(context, skip_special_tokens=skip)
                want = tokenizer.decode(context + ids, skip_special_tokens=skip)
                assert want.startswith(context_text)
                assert "".join(fast) == want[len(context_text) :], (text, skip, prompt)
                if prompt is None:
                    assert "".join(fast) == tokenizer.decode(ids, skip_special_tokens=skip)


@needs_decode_stream
def test_sentencepiece_test_tokenizer_splits_characters_and_has_special_tokens(detok_tokenizers):
    # What the comparison above relies on the SentencePiece-style tokenizer to exercise.
    tokenizer = detok_tokenizers["sentencepiece"]
    ids = tokenizer.encode("日本 😀", add_special_tokens=False)
    assert len(ids) > 8 and tokenizer.decode(ids) == "日本 😀"
    ids = tokenizer.encode("<s>Hello</s>", add_special_tokens=False)
    assert tokenizer.decode(ids) == "Hello" and tokenizer.decode(ids, skip_special_tokens=False) == "<s> Hello</s>"


@needs_decode_stream
@pytest.mark.parametrize("kind, way", [("byte-level", "bytes"), ("byte-level", "stream"), ("byte-level", "window"),
                                       ("sentencepiece", "stream"), ("sentencepiece", "window")])
def test_every_way_holds_back_and_flushes_partial_characters(detok_tokenizers, kind, way):
    tokenizer = detok_tokenizers[kind]
    ids = tokenizer.encode("ab😀", add_special_tokens=False)
    emoji = tokenizer.encode("😀", add_special_tokens=False)
    assert len(emoji) >= 4 and tokenizer.decode(emoji[-1:]) == "\ufffd"  # its last four are one byte each
    d = detokenizer(tokenizer, way=way)
    pieces = [d.add([i]) for i in ids[:-1]]
    assert pieces[-3:] == ["", "", ""]
    pieces.append(d.flush())
    assert "".join(pieces) == tokenizer.decode(ids[:-1])
    assert pieces[-1] in ("\ufffd", "\ufffd" * 3)  # byte-level BPE: one for the three bytes; byte fallback: each


@needs_decode_stream
@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece"])
def test_empty_and_one_token_outputs(detok_tokenizers, kind):
    tokenizer = detok_tokenizers[kind]
    prompt = tokenizer.encode("Hello", add_special_tokens=False)
    for way in fast_ways(tokenizer):
        for ids in ([], tokenizer.encode("world", add_special_tokens=False)[:1]):
            for prompt_ids in (None, prompt):
                fast, slow = both_ways(tokenizer, ids, 1, prompt_ids, way=way)
                assert fast == slow
                assert len(fast) == len(ids) + 1
        assert both_ways(tokenizer, [], 1, way=way)[0] == [""]
        one = tokenizer.encode("a", add_special_tokens=False)
        assert both_ways(tokenizer, one, 1, way=way)[0] == ["a", ""]


@needs_decode_stream
def test_prompt_context_ending_mid_character_uses_the_window(detok_tokenizers):
    # DecodeStream would return the context's own text with the first delta; the window algorithm does not.
    tokenizer = detok_tokenizers["byte-level"]
    prompt = tokenizer.encode("ab😀")[:-1]
    ids = tokenizer.encode("😀 x")
    d = IncrementalDetokenizer(tokenizer, prompt)
    assert d._stream is None and d._bytes is None
    slow = IncrementalDetokenizer(tokenizer, prompt, decode_stream=False)
    assert stream(d, ids, 1) == stream(slow, ids, 1) == ["", "", "", "😀", " ", "x", ""]


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_token_bytes_and_window_give_the_same_deltas_for_any_ids(detok_tokenizers, chunk):
    # Random ids of the whole vocabulary (byte tokens that make invalid UTF-8, special tokens), some past it, and
    # random prompts: the byte-level way returns what the window algorithm returns, delta by delta.
    tokenizer = detok_tokenizers["byte-level"]
    size = len(tokenizer.token_bytes())
    special = [tokenizer.backend.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")]
    assert None not in special
    rng = random.Random(chunk)
    compared = 0
    for _ in range(300):
        ids = [rng.choice(special) if rng.random() < 0.05 else rng.randrange(size + 2) for _ in range(rng.randrange(40))]
        prompt = [rng.randrange(size) for _ in range(rng.randrange(8))] or None
        for skip in (True, False):
            if IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip)._bytes is None:
                continue  # a prompt context that ends mid-character goes to the window algorithm
            fast, slow = both_ways(tokenizer, ids, chunk, prompt, skip, "bytes")
            assert fast == slow, (ids, prompt, skip)
            compared += 1
    assert compared > 300


def test_token_bytes_only_for_byte_level_decoders(detok_tokenizers):
    tokenizer = detok_tokenizers["byte-level"]
    table = tokenizer.token_bytes()
    ids = tokenizer.encode("日本語 😀 <|im_end|> end", add_special_tokens=False)
    for skip in (True, False):
        text = b"".join(tokenizer.token_bytes(skip)[i] for i in ids).decode("utf-8", "replace")
        assert text == tokenizer.decode(ids, skip_special_tokens=skip)
    assert tokenizer.token_bytes() is table  # made once
    assert detok_tokenizers["sentencepiece"].token_bytes() is None
    assert detok_tokenizers["placeholder"].token_bytes() is None


@needs_decode_stream
def test_a_decoder_that_rewrites_earlier_text_falls_back_to_the_window():
    # Fuse then Replace("ab" -> "X"): "a" then "ab c" -> "X c" no longer starts with "a". Such decoders are not
    # streamed; forced, DecodeStream raises and the window algorithm takes over with the same window.
    from tokenizers import decoders, models

    backend = tokenizers.Tokenizer(models.WordLevel({"a": 0, "b": 1, "c": 2}, unk_token="a"))
    backend.decoder = decoders.Sequence([decoders.Fuse(), decoders.Replace("ab", "X")])
    tokenizer = Tokenizer(backend, {}, [], None)
    assert not tokenizer.decodes_as_a_stream
    assert IncrementalDetokenizer(tokenizer)._stream is None
    tokenizer.__dict__["decodes_as_a_stream"] = True  # force the DecodeStream path
    ids = [0, 1, 2, 0, 2]
    forced = IncrementalDetokenizer(tokenizer)
    pieces = [forced.add([ids[0]]), forced.add([ids[1]])]
    assert forced._stream is not None
    pieces += [forced.add([i]) for i in ids[2:]] + [forced.flush()]
    assert forced._stream is None
    assert pieces == stream(IncrementalDetokenizer(tokenizer, decode_stream=False), ids, 1)


def test_decoders_that_are_not_streamed():
    from tokenizers import decoders, models

    backend = tokenizers.Tokenizer(models.WordLevel({"a": 0}, unk_token="a"))
    tokenizer = Tokenizer(backend, {}, [], None)
    replace_after_bytes = decoders.Sequence([decoders.ByteLevel(), decoders.Replace("a", "b")])
    for decoder in (decoders.WordPiece(), decoders.CTC(), replace_after_bytes):
        backend.decoder = decoder
        tokenizer.__dict__.pop("decodes_as_a_stream", None)
        assert not tokenizer.decodes_as_a_stream
        assert IncrementalDetokenizer(tokenizer)._stream is None
