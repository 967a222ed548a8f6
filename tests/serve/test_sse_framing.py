"""A streamed chunk that carries only text is framed from a template: its bytes must be exactly those the
response models make, for any text (quotes, backslashes, control characters, non-ASCII, the placeholder's own
characters), on both endpoints and every choice."""

from __future__ import annotations

import asyncio

import pytest

from eep_hpc.protocol import SamplingParams
from eep_hpc.serve.chat import ChatCompletion
from eep_hpc.serve.completions import ChoiceText, Completion
from eep_hpc.serve.generation import ChoiceDelta
from eep_hpc.serve.openai_protocol import ChatCompletionRequest, CompletionRequest
from eep_hpc.serve.prompts import Choice
from eep_hpc.serve.serving import Reply

TEXTS = [" of", 'say "hi"', "back\\slash", "tab\tnew\nline\r", "\x00\x01\x1f\x7f", "é漢字🙂", "\u2028\u2029",
         "</script>", "eep-hpc:text-slot", "{}[],:", "x" * 300]


def deltas(num_choices: int) -> list[ChoiceDelta]:
    out = []
    for k, text in enumerate(TEXTS):
        out.append(ChoiceDelta(k % num_choices, text, k + 1))
    out += [ChoiceDelta(i, "end", len(TEXTS) + 1, "length") for i in range(num_choices)]
    return out


def stream_bytes(reply: Reply, req, items: list[ChoiceDelta]) -> bytes:
    async def source():
        for d in items:
            yield d

    async def read():
        chunks: list[bytes] = []

        async def write(chunk: bytes) -> None:
            chunks.append(chunk)

        async def end(group: list[bytes]) -> None:
            chunks.extend(group)

        await reply.stream(source(), req).events(write, end)
        return b"".join(chunks)

    return asyncio.run(read())


def endpoints(n: int):
    choices = [Choice(i, [5, 6], SamplingParams()) for i in range(n)]
    completion_req = CompletionRequest.model_validate({"prompt": "x", "stream": True, "n": n,
                                                       "stream_options": {"include_usage": True}})
    yield Completion(choices, 2, [ChoiceText(None, None, False) for _ in choices]), completion_req
    chat_req = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "stream": True,
                                                     "n": n})
    yield ChatCompletion(None, choices, 2, False), chat_req


@pytest.mark.parametrize("n", [1, 3])
def test_text_chunks_from_the_template_equal_the_models_bytes(n, monkeypatch):
    for api, req in endpoints(n):
        items = deltas(n)
        fast = stream_bytes(Reply("cmpl-1", 1700000000, "m", api), req, items)
        monkeypatch.setattr(type(api), "plain_text", lambda self, index: False)
        slow = stream_bytes(Reply("cmpl-1", 1700000000, "m", api), req, items)
        monkeypatch.undo()
        assert fast.count(b"data: ") == slow.count(b"data: ") > len(TEXTS)
        assert fast == slow
