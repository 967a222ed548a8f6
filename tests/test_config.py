"""Config mistakes name the file, the table and the key, and list what is valid (eep_hpc/config.py)."""

from __future__ import annotations

import pytest

from eep_hpc.config import ConfigError, load_config


def error_of(tmp_path, text: str, **overrides) -> str:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path, **overrides)
    message = str(e.value)
    assert str(path) in message and "\n" not in message, message
    return message


def test_toml_syntax_error_names_the_file_and_line(tmp_path):
    msg = error_of(tmp_path, "[engine]\nblock_size = \n")
    assert "not valid TOML" in msg and "line 2" in msg


@pytest.mark.parametrize("text, bad, valid", [
    ("[engine]\nblock_sise = 16\n", "block_sise", ["block_size", "max_num_seqs"]),
    ("[serve]\nprot = 1\n", "prot", ["host", "port", "api_key"]),
    ("bogus = 1\n", "bogus", ["model", "engine", "parallel", "pools"]),
    ("[pools.big]\ngpus = 4\n", "gpus", ["gpus_per_node", "partition"]),
])
def test_unknown_keys_list_the_valid_ones(tmp_path, text, bad, valid):
    msg = error_of(tmp_path, text)
    assert f"`{bad}`" in msg and "valid keys:" in msg
    assert all(k in msg.split("valid keys:")[1] for k in valid), msg


def test_ranks_must_be_at_least_one(tmp_path):
    assert "ranks must be >= 1, got 0" in error_of(tmp_path, "[parallel]\nranks = 0\n")
    assert "ranks must be >= 1" in error_of(tmp_path, "", parallel={"ranks": 0})


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.toml"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize("text, message", [
    ("[model]\nmax_model_len = -1\n", "model.max_model_len must be >= 0, got -1"),
    ("[engine]\nblock_size = 0\n", "engine.block_size must be >= 1, got 0"),
    ("[engine]\nkv_cache_gib = 0\n", "engine.kv_cache_gib must be > 0, got 0"),
    ("[engine]\ngpu_memory_utilization = 0\n", "engine.gpu_memory_utilization must be > 0, got 0"),
    ("[engine]\nmax_num_batched_tokens = 0\n", "engine.max_num_batched_tokens must be >= 1, got 0"),
    ("[parallel]\nmoe_chunk_tokens = 0\n", "parallel.moe_chunk_tokens must be >= 1, got 0"),
    ("[parallel]\nredundant_experts = -2\n", "parallel.redundant_experts must be >= 0, got -2"),
    ("[serve]\nport = 70000\n", "serve.port must be <= 65535, got 70000"),
    ("[serve]\nshutdown_grace_s = -0.5\n", "serve.shutdown_grace_s must be >= 0, got -0.5"),
    ("[control]\nheartbeat_s = 0\n", "control.heartbeat_s must be > 0, got 0"),
    ("[control]\nstore_port = -1\n", "control.store_port must be >= 0, got -1"),
    ("[adapt]\nmax_ranks = 0\n", "adapt.max_ranks must be >= 1, got 0"),
    ("[adapt]\nkv_high = 1.2\n", "adapt.kv_high must be <= 1, got 1.2"),
    ("[standin]\nsteps_per_s = 0\n", "standin.steps_per_s must be > 0, got 0"),
])
def test_out_of_range_values_name_the_key_the_bound_and_the_value(tmp_path, text, message):
    assert error_of(tmp_path, text).endswith(f": {message}")


def test_zero_where_zero_means_auto_or_off_is_accepted():
    cfg = load_config(None, serve={"port": 0, "shutdown_grace_s": 0}, engine={"num_kv_blocks": 0},
                      model={"max_model_len": 0}, parallel={"eplb_period_s": 0})
    assert cfg.serve.port == 0 and cfg.serve.shutdown_grace_s == 0
