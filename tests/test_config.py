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
