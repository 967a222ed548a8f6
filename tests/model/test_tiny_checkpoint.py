import re
import threading
from pathlib import Path

import pytest
import torch

from eep_hpc.model import tiny
from eep_hpc.model.tiny import CHECKPOINT_NAME, ensure_tiny_checkpoint
from eep_hpc.model.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
PROMPTS = ["Hello, how are you?", "The weather is", "1 2 3 4 5", "def add(a, b):", "中文 😀", "Once upon a time"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return ensure_tiny_checkpoint(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def hf_model(checkpoint):
    model, info = transformers.Qwen3MoeForCausalLM.from_pretrained(checkpoint, output_loading_info=True)
    return model.eval(), info


def test_layout(checkpoint):
    assert checkpoint.name == CHECKPOINT_NAME
    assert sorted(path.name for path in checkpoint.iterdir()) == FILES


def test_generation_is_deterministic(checkpoint, tmp_path):
    other = ensure_tiny_checkpoint(tmp_path)
    assert other != checkpoint
    for name in FILES:
        assert (other / name).read_bytes() == (checkpoint / name).read_bytes(), name


def test_existing_checkpoint_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("EEP_HPC_CACHE", str(tmp_path))
    first = ensure_tiny_checkpoint()
    assert first == tmp_path / CHECKPOINT_NAME
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(tiny, "write_tiny_checkpoint", lambda path: pytest.fail("regenerated"))
    assert ensure_tiny_checkpoint() == first
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime


def test_loser_of_a_race_uses_the_winners_folder(tmp_path, monkeypatch):
    write = tiny.write_tiny_checkpoint

    def write_while_another_process_wins(path: Path) -> None:
        write(path)
        winner = tmp_path / CHECKPOINT_NAME
        winner.mkdir()
        (winner / "marker").write_text("winner")

    monkeypatch.setattr(tiny, "write_tiny_checkpoint", write_while_another_process_wins)
    assert ensure_tiny_checkpoint(tmp_path) == tmp_path / CHECKPOINT_NAME
    assert (tmp_path / CHECKPOINT_NAME / "marker").exists()
    assert [path.name for path in tmp_path.iterdir()] == [CHECKPOINT_NAME]  # no staging folder left behind


def test_concurrent_callers_get_one_complete_folder(tmp_path):
    results = []
    threads = [threading.Thread(target=lambda: results.append(ensure_tiny_checkpoint(tmp_path))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [tmp_path / CHECKPOINT_NAME] * 4
    assert [path.name for path in tmp_path.iterdir()] == [CHECKPOINT_NAME]
    assert sorted(path.name for path in results[0].iterdir()) == FILES


def test_tokenizer(checkpoint):
    tokenizer = Tokenizer.from_dir(checkpoint)
    assert tokenizer.vocab_size == 512
    im_end, endoftext = tokenizer.backend.token_to_id("<|im_end|>"), tokenizer.backend.token_to_id("<|endoftext|>")
    assert tokenizer.eos_token_ids == [im_end, endoftext]
    assert tokenizer.encode("<|im_start|>user\nhi<|im_end|>")[0] == tokenizer.backend.token_to_id("<|im_start|>")
    for text in ["plain ASCII, 123.", "Grüße, naïve café", "中文测试", "emoji 😀🎉", "\x00\ttabs\r\n"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_transformers_loads_it_completely(hf_model):
    model, info = hf_model
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_experts) == (2, 64, 8)
    assert model.lm_head.weight.dtype == torch.float32


def greedy(model, tokenizer, prompt: str, new_tokens: int = 16) -> list[int]:
    ids = torch.tensor([tokenizer.encode(prompt)])
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1] :].tolist()


def test_greedy_outputs_vary(hf_model, checkpoint):
    model, _ = hf_model
    tokenizer = Tokenizer.from_dir(checkpoint)
    outputs = [greedy(model, tokenizer, prompt) for prompt in PROMPTS]
    assert len({tuple(output) for output in outputs}) == len(PROMPTS)
    for output in outputs:
        assert len(set(output)) >= 8, output  # not one token (or a short loop) repeated


def test_logits_are_well_separated_and_all_experts_used(hf_model, checkpoint):
    model, _ = hf_model
    tokenizer = Tokenizer.from_dir(checkpoint)
    chosen: dict[int, list[torch.Tensor]] = {}
    hooks = [
        layer.mlp.gate.register_forward_hook(lambda module, args, out, i=i: chosen.setdefault(i, []).append(out[2]))
        for i, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad():
        logits = model(torch.tensor([tokenizer.encode(" ".join(PROMPTS))])).logits[0]  # [T, V]
    for hook in hooks:
        hook.remove()
    top2 = logits.topk(2, dim=-1).values
    gaps = top2[:, 0] - top2[:, 1]
    assert gaps.median() > 0.1 and gaps.min() > 1e-3
    for layer, indices in chosen.items():
        assert torch.bincount(torch.cat(indices).flatten(), minlength=8).min() > 0, f"layer {layer} has an idle expert"


def _build(checkpoint, stream):
    from eep_hpc.config import ModelConfig
    from eep_hpc.model.arch import load_arch
    from eep_hpc.model.loader import build_model

    arch = load_arch(checkpoint)
    every_expert = [list(range(arch.num_experts))] * len(arch.moe_layers)
    return build_model(arch, ModelConfig(), checkpoint, every_expert, 64, torch.device("cpu"), torch.float32,
                       progress_stream=stream)


def test_loading_logs_a_line_per_tensor_group_with_bytes_and_rate(checkpoint, caplog):
    """Not a terminal (a rank's log file): one line per group, no carriage return; the groups' bytes add up to
    every parameter of the model."""
    import io

    stream = io.StringIO()
    with caplog.at_level("INFO", logger="eep_hpc.load"):
        model = _build(checkpoint, stream)
    assert stream.getvalue() == ""
    lines = [r.getMessage() for r in caplog.records if r.name == "eep_hpc.load"]
    groups = ["dense weights", "experts of MoE layer 0 of 2", "experts of MoE layer 1 of 2", "done"]
    assert len(lines) == len(groups), lines
    for line, group in zip(lines, groups):
        assert line.startswith(f"loading weights from {checkpoint}") and group in line, line
        assert re.search(r": [\d,.]+ MiB in \d+\.\d\d s \(\d+\.\d\d GB/s\)$", line), line
    mib = [float(re.search(r": ([\d,.]+) MiB", line).group(1).replace(",", "")) for line in lines]
    total = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    assert mib[-1] == pytest.approx(total, abs=0.05) and sum(mib[:-1]) == pytest.approx(total, abs=0.15)


def test_loading_on_a_terminal_draws_a_bar(checkpoint, caplog):
    import io

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    with caplog.at_level("INFO", logger="eep_hpc.load"):
        _build(checkpoint, stream)
    bar = stream.getvalue()
    assert "\r" in bar and "100%" in bar and "B/s" in bar, bar
    assert [r.getMessage().split(" done: ")[0] for r in caplog.records if r.name == "eep_hpc.load"] == [
        f"loading weights from {checkpoint}"]  # only the total: the bar showed the groups
