"""The head benchmark's lean SSE client counts the tokens of an event that carries several by their text."""

from __future__ import annotations

import asyncio
import json

from eep_hpc.bench.sse_client import _Response


def chunked(events: list[bytes]) -> bytes:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    return head + b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"


def chunk(text: str, finish=None, usage=None) -> bytes:
    body = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}], "usage": usage}
    return b"data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def test_tokens_of_merged_events_are_counted_by_their_text():
    pieces = [" a", 'é"', "\\x"]  # a quote and a backslash (escaped in JSON) and a non-ASCII character
    events = [chunk(pieces[0]), chunk(pieces[1]), chunk(pieces[2] + pieces[0] + pieces[1]),
              chunk(pieces[2], "length", {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}),
              b"data: [DONE]\n\n"]

    async def read(keep_text: bool):
        proto = _Response()
        done = proto.expect(keep_text, [len(p) for p in pieces])
        proto.data_received(chunked(events))
        return await done

    for keep_text in (False, True):
        result = asyncio.run(read(keep_text))
        assert result.error == "" and result.finish_reason == "length" and result.completion_tokens == 6
        assert len(result.received_at) == 6 and result.text_events == 4, keep_text


def test_an_error_answer_that_is_not_streamed_carries_its_body():
    body = b'{"error":{"message":"The model `x` does not exist.","type":"NotFoundError","code":404}}'
    head = b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)

    async def read():
        proto = _Response()
        done = proto.expect(keep_text=False)
        proto.data_received(head + body[:10])  # the body arrives in two parts
        assert not done.done()
        proto.data_received(body[10:])
        return await done

    result = asyncio.run(read())
    assert result.status == 404 and result.error == "HTTP 404 (not chunked): " + body.decode()
