"""What the API does not do is refused with an OpenAI-shaped 400 naming the field, never silently ignored (README,
"Configuration": what is not supported); a field that means "off" is accepted."""

from __future__ import annotations

import httpx
import pytest

CHAT = {"messages": [{"role": "user", "content": "hi"}]}

# (route, fields added to a valid request, the error's param, its message)
UNSUPPORTED = [
    ("completions", {"min_p": 0.1}, "min_p", "min_p: not supported (got 0.1)"),
    ("chat/completions", {"min_p": 0.05}, "min_p", "min_p: not supported (got 0.05)"),
    ("completions", {"use_beam_search": True}, "use_beam_search", "use_beam_search: not supported (got True)"),
    ("completions", {"logit_bias": {"5": 1.0}}, "logit_bias", "logit_bias: not supported (got {'5': 1.0})"),
    ("completions", {"suffix": "end"}, "suffix", "suffix: not supported (got 'end')"),
    ("completions", {"best_of": 2}, None, "request body: best_of is not supported (it may only equal n)"),
    ("chat/completions", {"tool_choice": "auto"}, "tool_choice",
     "tool_choice: tool calling is not supported; tool_choice may only be 'none' (got 'auto')"),
    ("chat/completions", {"response_format": {"type": "json_object"}}, "response_format",
     "response_format: response_format type 'json_object' is not supported (only 'text') (got {'type': "
     "'json_object'})"),
]


@pytest.mark.parametrize("route, fields, param, message", UNSUPPORTED,
                         ids=[f"{route} {sorted(fields)[0]}" for route, fields, _, _ in UNSUPPORTED])
def test_unsupported_fields_are_a_400_naming_them(api, route, fields, param, message):
    body = {"model": api.model, "max_tokens": 2, **({"prompt": "hi"} if route == "completions" else CHAT), **fields}
    r = httpx.post(f"{api.url}/v1/{route}", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json() == {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}


@pytest.mark.parametrize("fields", [{"min_p": 0}, {"use_beam_search": False}, {"logit_bias": {}},
                                    {"tool_choice": "none"}, {"response_format": {"type": "text"}}])
def test_the_off_value_of_an_unsupported_field_is_accepted(api, fields):
    body = {"model": api.model, "max_tokens": 2, **CHAT, **fields}
    r = httpx.post(f"{api.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
