"""A stand-in tokenizer for dummy-weight models whose directory holds only config.json (benchmarks of big
architectures without downloading them): one word-level token "<tN>" per id of the config's vocabulary, so any
token id the model can produce decodes, and token-id prompts (what `eep-hpc bench` sends) need no text at all."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers

CHAT_TEMPLATE = ("{% for m in messages %}<t1>{{ m['role'] }} {{ m['content'] }}<t2> {% endfor %}"
                 "{% if add_generation_prompt %}<t1>assistant {% endif %}")


def write_placeholder_tokenizer(model_dir: str | Path, out_dir: str | Path) -> Path:
    """Write tokenizer.json/tokenizer_config.json sized to model_dir's config.json into out_dir."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    vocab = {f"<t{i}>": i for i in range(cfg["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<t0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<t2>", "chat_template": CHAT_TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast"}))
    return out
