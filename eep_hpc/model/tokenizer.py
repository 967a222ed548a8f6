"""Tokenizer of a Hugging Face-format model directory, without transformers.

`Tokenizer` wraps tokenizer.json (the `tokenizers` library) and reads the rest of what a server needs from
tokenizer_config.json, generation_config.json and config.json: special tokens, end-of-sequence ids and the chat
template, which is rendered the way transformers renders it (same sandbox, globals and `tojson`).
`IncrementalDetokenizer` turns a request's stream of output ids into text deltas for streaming.
"""

from __future__ import annotations

import codecs
import json
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

try:  # tokenizers' incremental decoder, in versions whose DecodeStream takes `ids` (the prompt context)
    from tokenizers.decoders import DecodeStream

    DecodeStream(ids=[], skip_special_tokens=True)
except (ImportError, TypeError):
    DecodeStream = None

# The named special tokens transformers passes to chat templates (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Tokenizer:
    """Encode, decode and render chat prompts the way transformers does for the same model directory."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        tokenizer_config: dict[str, Any],
        eos_token_ids: list[int],
        chat_template: str | None,
    ):
        self.backend = backend
        # name ("bos_token", ...) -> token text, for the names the config sets
        self.special_tokens = {
            name: text
            for name in SPECIAL_TOKEN_NAMES
            if (text := _token_text(tokenizer_config.get(name))) is not None
        }
        self.bos_token_id = self._id_of(self.special_tokens.get("bos_token"))
        self.add_bos_token = bool(tokenizer_config.get("add_bos_token", False))
        self.add_eos_token = bool(tokenizer_config.get("add_eos_token", False))
        self.eos_token_ids = eos_token_ids
        self.chat_template = chat_template
        self._compiled_template: jinja2.Template | None = None

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        tokenizer_config = _read_json(path / "tokenizer_config.json")
        generation_config = _read_json(path / "generation_config.json")
        model_config = _read_json(path / "config.json")

        eos_ids: list[int] = []
        eos_text = _token_text(tokenizer_config.get("eos_token"))
        candidates = [backend.token_to_id(eos_text)] if eos_text is not None else []
        for config in (generation_config, model_config):
            value = config.get("eos_token_id")
            candidates += value if isinstance(value, list) else [value]
        for token_id in candidates:
            if token_id is not None and token_id not in eos_ids:
                eos_ids.append(token_id)

        return cls(backend, tokenizer_config, eos_ids, _read_chat_template(path, tokenizer_config))

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer knows, added tokens included (transformers' `len(tokenizer)`)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch releases the GIL while it works (encode does not): a megabyte prompt tokenized in the API's
        # worker thread then no longer stalls every other stream for seconds
        ids = self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        if not add_special_tokens:
            return ids
        # tokenizer.json's post-processor adds BOS/EOS where the model wants them; add_bos_token/add_eos_token in
        # tokenizer_config only add what it left out (transformers' model-specific classes rebuild it that way).
        if self.add_bos_token and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id, *ids]
        eos_token_id = self._id_of(self.eos_token)
        if self.add_eos_token and eos_token_id is not None and ids[-1:] != [eos_token_id]:
            ids = [*ids, eos_token_id]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @cached_property
    def decodes_as_a_stream(self) -> bool:
        """Whether `IncrementalDetokenizer` may use tokenizers' DecodeStream: it exists here, and the decoder only
        appends text for further ids (decoding ids P+Q gives the text of P followed by more), where DecodeStream
        returns what the window algorithm returns. ByteLevel, Metaspace, ByteFallback, Fuse and Strip do; Replace
        does until tokens are fused (after, it may rewrite across a boundary); others (WordPiece's cleanup, CTC's
        merging of repeats) are left to the window algorithm."""
        if DecodeStream is None or not isinstance(self.backend, tokenizers.Tokenizer):
            return False
        if (decoder := self.backend.decoder) is None:  # tokens joined with spaces
            return True
        spec = json.loads(decoder.__getstate__())
        steps = spec.get("decoders", []) if spec.get("type") == "Sequence" else [spec]
        fused = False
        for step in steps:
            kind = step.get("type")
            if kind not in _APPENDING_DECODERS or (kind == "Replace" and fused):
                return False
            fused |= kind in ("Fuse", "ByteLevel", "ByteFallback")
        return True

    def token_bytes(self, skip_special_tokens: bool = True) -> list[bytes] | None:
        """Per token id, the bytes its text adds, where the decoder is byte-level BPE's alone (GPT-2's; Qwen, Llama 3
        and DeepSeek ship it): that decoder maps each token to bytes of its own, joins them and reads them as UTF-8,
        U+FFFD for what is not (tokenizers' ByteLevel.decode_chain), so the text of any ids is their bytes joined
        and read so. None for other decoders. Made once per flag, from one decode of every id."""
        tables = self.__dict__.setdefault("_token_bytes", {})
        if skip_special_tokens not in tables:
            tables[skip_special_tokens] = self._read_token_bytes(skip_special_tokens)
        return tables[skip_special_tokens]

    def _read_token_bytes(self, skip_special_tokens: bool) -> list[bytes] | None:
        decoder = self.backend.decoder if isinstance(self.backend, tokenizers.Tokenizer) else None
        if decoder is None or json.loads(decoder.__getstate__()).get("type") != "ByteLevel":
            return None
        size = max(self.backend.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        texts = self.backend.decode_batch([[i] for i in range(size)], skip_special_tokens=skip_special_tokens)
        table = []
        for token_id, text in enumerate(texts):
            if "\ufffd" not in text:
                table.append(text.encode())
                continue
            # Not UTF-8 on its own (part of a character): the bytes are those its vocabulary entry stands for.
            raw = byte_level_bytes(self.backend.id_to_token(token_id))
            if raw.decode("utf-8", "replace") != text:  # not the decoder this reading assumes
                return None
            table.append(raw)
        return table

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None, **kwargs
    ) -> str:
        """Render a conversation to the prompt text. Raises ValueError when the template cannot render it."""
        if self.chat_template is None:
            raise ValueError("model has no chat template")
        # Like transformers: keys set to None (OpenAI's `content: null` next to tool_calls) are dropped, because
        # templates test for a missing key, not for None.
        messages = [{key: value for key, value in message.items() if value is not None} for message in messages]
        try:
            if self._compiled_template is None:
                self._compiled_template = _chat_environment().from_string(self.chat_template)
            return self._compiled_template.render(
                **self.special_tokens,
                **kwargs,
                messages=messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
            )
        # The template is code from the checkpoint and the messages come from a client: whatever goes wrong while
        # rendering them is a bad request, not a server error.
        except Exception as error:
            raise ValueError(f"chat template error: {type(error).__name__}: {error}") from error

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)


_APPENDING_DECODERS = {"ByteLevel", "Metaspace", "ByteFallback", "Fuse", "Strip", "Replace"}


@lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[str, int]:
    """GPT-2 byte-level BPE: the printable character each byte is written as -> the byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def byte_level_bytes(token: str | None) -> bytes:
    """The bytes the ByteLevel decoder makes of one vocabulary entry: its characters through the byte-level
    alphabet, or (an added token with other characters) its own UTF-8."""
    if token is None:
        return b""
    alphabet = byte_level_alphabet()
    if all(c in alphabet for c in token):
        return bytes(alphabet[c] for c in token)
    return token.encode()


class IncrementalDetokenizer:
    """Text deltas of one request's output ids, for streaming.

    Each `add` decodes only a short window of ids: those of the last text returned (the *prefix*, for context such
    as a leading space or a byte continued from it) and those not yet returned. The text of the window past the
    prefix is the delta. While the window's text ends with U+FFFD, its last character is still incomplete (a
    multi-byte character spread over several tokens), so nothing is returned until more ids arrive.
    Joined, the deltas equal `tokenizer.decode(output_ids)`, except that a character still incomplete when the
    output ends is only returned by `flush()` (as U+FFFD), and that with prompt context a SentencePiece-style
    tokenizer keeps the first token's leading space, as the text continues the prompt.

    Where the tokenizer allows it (`Tokenizer.decodes_as_a_stream`), the same algorithm runs inside tokenizers'
    DecodeStream: one Rust call per `add`, which decodes the window once (twice when it returns text), where the
    Python version decodes the prefix and the window on every call. The window is still kept here, for `flush()`
    and for the cases DecodeStream declines: a prompt context whose text ends in an incomplete character
    (DecodeStream would return the prompt's text with the first delta) and a window whose text does not start with
    the prefix's (DecodeStream raises; this algorithm goes on).

    With a byte-level BPE tokenizer (`Tokenizer.token_bytes`) no tokenizer call is needed per token: the window's
    text is its ids' bytes read as UTF-8, which Python's UTF-8 decoder does as bytes arrive (the start of a
    character it cannot decode yet is what makes the window's text end with U+FFFD), and the text decoded since the
    last delta is returned unless it ends with U+FFFD, as the window algorithm does. The same deltas, for a list
    lookup and a C call per token (tests/model/test_tokenizer.py compares the three ways).
    """

    PROMPT_CONTEXT = 5  # prompt ids kept as the first prefix, so the first output token decodes in context

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: list[int] | None = None,
        skip_special_tokens: bool = True,
        decode_stream: bool = True,  # False: the Python window algorithm alone (tests compare the ways)
    ):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # Window of ids: [0, read_offset) is the prefix, [read_offset, end) is not yet returned.
        self._window: list[int] = list(prompt_token_ids or [])[-self.PROMPT_CONTEXT :]
        self._read_offset = len(self._window)
        self._stream = None  # the DecodeStream, while it is used
        self._bytes: list[bytes] | None = None  # per id its bytes (Tokenizer.token_bytes), where they are used
        if not (
            decode_stream
            and isinstance(tokenizer, Tokenizer)
            and type(tokenizer).decode is Tokenizer.decode  # the faster ways decode as the backend itself does
            and "decode" not in vars(tokenizer)
            and not (self._window and self._decode(self._window).endswith("\ufffd"))
        ):
            return
        self._bytes = tokenizer.token_bytes(skip_special_tokens)
        if self._bytes is not None:
            self._partial = b""  # the start of a character, not decoded yet
            self._held = ""  # text decoded since the last delta, which ended with U+FFFD
        elif tokenizer.decodes_as_a_stream:
            self._backend = tokenizer.backend
            self._stream = DecodeStream(ids=self._window, skip_special_tokens=skip_special_tokens)

    def add(self, new_ids: list[int]) -> str:
        """Text that the new ids complete; "" while a character is still incomplete."""
        if self._bytes is not None:
            return self._add_bytes(new_ids)
        self._window.extend(new_ids)
        if self._stream is not None:
            try:
                delta = self._stream.step(self._backend, new_ids[0] if len(new_ids) == 1 else list(new_ids))
            except Exception:  # the window's text does not continue the prefix's: the Python version goes on
                self._stream = None
            else:
                return "" if delta is None else self._advance(delta)
        prefix_text = self._decode(self._window[: self._read_offset])
        text = self._decode(self._window)
        if text.endswith("\ufffd") or len(text) <= len(prefix_text):
            return ""
        return self._advance(text[len(prefix_text) :])

    def _add_bytes(self, new_ids: list[int]) -> str:
        table = self._bytes
        try:
            data = table[new_ids[0]] if len(new_ids) == 1 else b"".join([table[i] for i in new_ids])
        except IndexError:  # an id past the vocabulary decodes to nothing
            data = b"".join([table[i] if i < len(table) else b"" for i in new_ids])
        if self._partial:
            data = self._partial + data
        text, used = codecs.utf_8_decode(data, "replace", False)  # what an incremental UTF-8 decoder does, in C
        self._partial = data[used:]
        if self._held:
            text = self._held + text
        if self._partial or text.endswith("\ufffd"):  # the window's text would end with U+FFFD
            self._held = text
            return ""
        self._held = ""
        return text

    def flush(self) -> str:
        """The text still held back, incomplete characters as U+FFFD; call once the output has ended."""
        if self._bytes is not None:
            text = self._held + codecs.utf_8_decode(self._partial, "replace", True)[0]
            self._held, self._partial = "", b""
            return text
        self._stream = None
        prefix_text = self._decode(self._window[: self._read_offset])
        text = self._decode(self._window)
        return self._advance(text[len(prefix_text) :]) if len(text) > len(prefix_text) else ""

    def _advance(self, delta: str) -> str:
        # The ids just returned become the next prefix.
        del self._window[: self._read_offset]
        self._read_offset = len(self._window)
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}…{% endgeneration %}`, which transformers uses to mark assistant tokens for training
    masks; rendering just keeps the body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _chat_environment() -> ImmutableSandboxedEnvironment:
    """The environment transformers renders chat templates in: chat templates are untrusted code."""

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    # Jinja's own tojson escapes HTML characters; templates expect plain json.dumps.
    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
    )
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = strftime_now
    return environment


def _read_chat_template(path: Path, tokenizer_config: dict[str, Any]) -> str | None:
    # Newer checkpoints keep the template in its own file, which transformers prefers to the config entry.
    if (template_file := path / "chat_template.jinja").exists():
        return template_file.read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # several named templates: [{"name": ..., "template": ...}]
        named = {entry["name"]: entry["template"] for entry in template}
        template = named.get("default")
    return template


def _token_text(value: str | dict | None) -> str | None:
    # A special token is written either as its text or as a serialized AddedToken {"content": ..., ...}.
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
