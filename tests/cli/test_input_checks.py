"""Every CLI and admin input is checked before anything starts or changes, and a mistake is one line that names it.

Two tables: `eep-hpc` command lines (exit 2, one stderr line, nothing started: no discovery file, no rank job; the
admin commands are refused before any request, so their --url leads nowhere), and admin requests to a serving head
(a 400 with an OpenAI-shaped error naming the field, and no new epoch, no event, the same members). A rebalance that
would move nothing is answered as a no-op in the same epoch (tests/serve/test_admin.py).
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys

import httpx
import pytest

from eep_hpc.config import ServeConfig

NOWHERE = "http://127.0.0.1:9"  # nothing listens: a command that sent a request would fail otherwise


def eep(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eep_hpc.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


# config files ({file:NAME} in a row): their text; "missing" is never written, "dir" is a directory
FILES = {
    "bad-toml": "[engine]\nblock_size = \n",
    "unknown-key": "[serve]\nprot = 8000\n",
    "unknown-table": "[servr]\nport = 8000\n",
    "bad-enum": '[model]\ndtype = "fp8"\n',
    "bad-type": '[serve]\nport = "8000"\n',
}

SERVE_KEYS = ", ".join(ServeConfig.__struct_fields__)

# (arguments of `eep-hpc`, the one line on stderr). In them {file:NAME} is a config file of FILES, {model:KIND} a
# model directory wrong that way, {busy} a port something listens on.
CLI_MISTAKES = [
    # serve: the config, before the model code is even imported
    (["serve", "--ranks", "0"], "eep-hpc: config: parallel.ranks must be >= 1, got 0"),
    (["serve", "--ranks", "-2"], "eep-hpc: config: parallel.ranks must be >= 1, got -2"),
    (["serve", "--port", "-1"], "eep-hpc: config: serve.port must be >= 0, got -1"),
    (["serve", "--port", "65536"], "eep-hpc: config: serve.port must be <= 65535, got 65536"),
    (["serve", "--set", "control.rank_timeout_s=0"], "eep-hpc: config: control.rank_timeout_s must be > 0, got 0"),
    (["serve", "--set", "engine.max_num_seqs=-4"], "eep-hpc: config: engine.max_num_seqs must be >= 1, got -4"),
    (["serve", "--set", "engine.block_size=0"], "eep-hpc: config: engine.block_size must be >= 1, got 0"),
    (["serve", "--set", "engine.gpu_memory_utilization=1.5"],
     "eep-hpc: config: engine.gpu_memory_utilization must be <= 1, got 1.5"),
    (["serve", "--set", "serve.shutdown_grace_s=-1"], "eep-hpc: config: serve.shutdown_grace_s must be >= 0, got -1"),
    (["serve", "--set", "serve.port=x"], "eep-hpc: config: serve.port must be an integer, got 'x'"),
    (["serve", "--set", "engine.cuda_graphs=maybe"], "eep-hpc: config: engine.cuda_graphs must be true or false, "
                                                    "got 'maybe'"),
    (["serve", "--set", "model.dtype=fp8"],
     "eep-hpc: config: model.dtype must be one of 'auto', 'float32', 'bfloat16', 'float16', got 'fp8'"),
    (["serve", "--set", "serve.prot=1"], f"eep-hpc: config: unknown key `prot` in [serve]; valid keys: {SERVE_KEYS}"),
    (["serve", "--set", "max_num_seqs=8"], "eep-hpc: --set wants SECTION.KEY=VALUE (e.g. engine.max_num_seqs=512), "
                                           "got 'max_num_seqs=8'"),
    (["serve", "--config", "{file:bad-toml}"],
     "eep-hpc: {file:bad-toml}: not valid TOML: Invalid value (at line 2, column 14)"),
    (["serve", "--config", "{file:unknown-key}"],
     f"eep-hpc: {{file:unknown-key}}: unknown key `prot` in [serve]; valid keys: {SERVE_KEYS}"),
    (["serve", "--config", "{file:unknown-table}"],
     "eep-hpc: {file:unknown-table}: unknown key `servr` in the top level (whose keys are tables); valid keys: "
     "model, engine, parallel, serve, control, adapt, standin, pools"),
    (["serve", "--config", "{file:bad-enum}"],
     "eep-hpc: {file:bad-enum}: model.dtype must be one of 'auto', 'float32', 'bfloat16', 'float16', got 'fp8'"),
    (["serve", "--config", "{file:bad-type}"], "eep-hpc: {file:bad-type}: serve.port must be an integer, got '8000'"),
    (["serve", "--config", "{file:missing}"], "eep-hpc: config file not found: {file:missing}"),
    (["serve", "--config", "{file:dir}"], "eep-hpc: config path {file:dir} is a directory, not a TOML file"),
    # serve: the model directory and the port, before any rank starts
    (["serve", "--model", "{model:missing}"], "eep-hpc: model path {model:missing} does not exist (model.path / "
                                              "--model: a Hugging Face-format directory, or 'tiny')"),
    (["serve", "--model", "{model:empty}"],
     "eep-hpc: model path {model:empty} has no config.json (expected a Hugging Face-format directory)"),
    (["serve", "--model", "{model:no-weights}"], "eep-hpc: model path {model:no-weights} has no *.safetensors weights "
                                                 '(model.load_format = "dummy" serves random weights of its shape)'),
    (["serve", "--model", "{model:llama}"], "eep-hpc: model path {model:llama}: config.json: unsupported architecture "
     "['LlamaForCausalLM']; supported: ['DeepseekV2ForCausalLM', 'MixtralForCausalLM', 'Qwen3MoeForCausalLM']"),
    (["serve", "--model", "{model:bad-json}"],
     "eep-hpc: model path {model:bad-json}: config.json: Expecting value: line 1 column 20 (char 19)"),
    (["serve", "--port", "{busy}"], "eep-hpc: cannot listen on 127.0.0.1:{busy} (serve.host, serve.port): Address "
                                    "already in use"),
    # the admin commands: refused before they send anything
    (["grow", "0", "--url", NOWHERE], "eep-hpc: grow needs N >= 1 ranks to add, got 0"),
    (["grow", "-3", "--url", NOWHERE], "eep-hpc: grow needs N >= 1 ranks to add, got -3"),
    (["grow", "2", "--pool", "a:1", "--url", NOWHERE],
     "eep-hpc: with --pool NAME:COUNT give no N, and each COUNT >= 1"),
    (["grow", "--pool", "a:0", "--url", NOWHERE], "eep-hpc: with --pool NAME:COUNT give no N, and each COUNT >= 1"),
    (["grow", "--pool", "a:x", "--url", NOWHERE], "eep-hpc: --pool takes NAME or NAME:COUNT"),
    (["shrink", "0", "--url", NOWHERE], "eep-hpc: shrink needs N >= 1 ranks to remove, got 0"),
    (["shrink", "--url", NOWHERE], "eep-hpc: shrink needs exactly one of N, --rank R, --node HOST"),
    (["shrink", "1", "--rank", "2", "--url", NOWHERE], "eep-hpc: shrink needs exactly one of N, --rank R, --node HOST"),
    (["adapt", "--min", "3", "--max", "1", "--url", NOWHERE],
     "eep-hpc: adapt needs 1 <= --min <= --max, got --min 3 --max 1"),
    (["adapt", "--min", "0", "--max", "2", "--url", NOWHERE],
     "eep-hpc: adapt needs 1 <= --min <= --max, got --min 0 --max 2"),
    (["status", "--run-dir", "{file:missing}"], "eep-hpc: no running head found: {file:missing}/head.json does not "
                                                "exist (is `eep-hpc serve` running with this run dir?)"),
]


def model_dir(tmp_path, kind: str) -> str:
    """A --model argument that is wrong in one way."""
    path = tmp_path / kind
    if kind == "missing" or path.exists():
        return str(path)
    path.mkdir()
    if kind in ("no-weights", "llama", "bad-json"):
        text = {"no-weights": '{"architectures": ["Qwen3MoeForCausalLM"]}',
                "llama": '{"architectures": ["LlamaForCausalLM"]}', "bad-json": '{"architectures": ['}[kind]
        (path / "config.json").write_text(text)
    if kind in ("llama", "bad-json"):
        (path / "model.safetensors").write_bytes(b"")
    return str(path)


def config_file(tmp_path, name: str) -> str:
    path = tmp_path / "configs" / name
    path.parent.mkdir(exist_ok=True)
    if name == "dir":
        path.mkdir(exist_ok=True)
    elif name in FILES:
        path.write_text(FILES[name])
    return str(path)


@pytest.mark.parametrize("args, line", CLI_MISTAKES, ids=[" ".join(a) for a, _ in CLI_MISTAKES])
def test_cli_mistakes_end_in_one_line_before_anything_starts(tmp_path, args, line):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()

        def fill(text: str) -> str:
            text = text.replace("{busy}", str(busy.getsockname()[1]))
            text = re.sub(r"\{file:([\w-]+)\}", lambda m: config_file(tmp_path, m.group(1)), text)
            return re.sub(r"\{model:([\w-]+)\}", lambda m: model_dir(tmp_path, m.group(1)), text)

        run_dir = tmp_path / "run"
        extra = ["--run-dir", str(run_dir)] if args[0] == "serve" else []
        r = eep(*[fill(a) for a in args], *extra)
        assert (r.returncode, r.stderr, r.stdout) == (2, fill(line) + "\n", "")
    jobs = run_dir / "jobs"
    assert not (run_dir / "head.json").exists() and not (jobs.exists() and any(jobs.iterdir())), "something started"


def test_a_missing_config_is_named_before_torch_is_imported(tmp_path):
    """At once: the head, its model code and torch are not even imported (they take seconds)."""
    missing = tmp_path / "nope.toml"
    code = ("import sys; from eep_hpc.cli import main; rc = main(['serve', '--config', sys.argv[1]]); "
            "print(rc, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, str(missing)], capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["2", "False"], (r.stdout, r.stderr)
    assert r.stderr == f"eep-hpc: config file not found: {missing}\n"


# (route, body, the error's param, its message): each a 400 against the `api` fixture's head (one rank, no pools)
ADMIN_MISTAKES = [
    ("/admin/scale/grow", {"n": 0}, "n", "n: Input should be greater than or equal to 1 (got 0)"),
    ("/admin/scale/grow", {"n": -1}, "n", "n: Input should be greater than or equal to 1 (got -1)"),
    ("/admin/scale/grow", {"n": True}, "n", "n: Input should be a valid integer (got True)"),
    ("/admin/scale/grow", {"n": 1.5}, "n", "n: Input should be a valid integer (got 1.5)"),
    ("/admin/scale/grow", {"n": 1025}, "n", "n: Input should be less than or equal to 1024 (got 1025)"),
    ("/admin/scale/grow", {"n": 1, "pools": {"x": 1}}, "n", "give n (with one pool) or pools, not both"),
    ("/admin/scale/grow", {"pools": {}}, "pools", "pools is empty: give at least one {pool: count}"),
    ("/admin/scale/grow", {"pools": {"x": 0}}, "pools.x",
     "pools.x: Input should be greater than or equal to 1 (got 0)"),
    ("/admin/scale/grow", {"pool": "big"}, "pool", "unknown pool 'big'; configured: []"),
    ("/admin/scale/grow", {"wait": "no"}, "wait", "wait: Input should be a valid boolean (got 'no')"),
    ("/admin/scale/grow", {"nn": 1}, "nn", "nn: Extra inputs are not permitted (got 1)"),
    ("/admin/scale/shrink", {"rank_ids": []}, "rank_ids", "rank_ids is empty: name at least one rank to remove"),
    ("/admin/scale/shrink", {"rank_ids": [7]}, None, "rank(s) [7] are not members; members are [0]"),
    ("/admin/scale/shrink", {"rank_ids": [0, 7]}, None, "rank(s) [7] are not members; members are [0]"),
    ("/admin/scale/shrink", {"rank_ids": [0]}, None, "cannot shrink below one rank"),
    ("/admin/scale/shrink", {"n": 0}, "n", "n: Input should be greater than or equal to 1 (got 0)"),
    ("/admin/scale/shrink", {"n": 1}, "n", "cannot remove 1 of 1 ranks: at least one must stay"),
    ("/admin/scale/shrink", {}, None, "give exactly one of n, rank_ids, node"),
    ("/admin/scale/shrink", {"n": 1, "node": "x"}, None, "give exactly one of n, rank_ids, node"),
    ("/admin/scale/shrink", {"node": "nohost"}, "node", "no member rank runs on node 'nohost'"),
    ("/admin/adapt", {"min": 3, "max": 1}, "min", "min (3) must not exceed max (1)"),
    ("/admin/adapt", {"min": 0, "max": 1}, "min", "min: Input should be greater than or equal to 1 (got 0)"),
    ("/admin/adapt", {"min": 1}, "max", "max: Field required"),
]


@pytest.mark.parametrize("route, body, param, message", ADMIN_MISTAKES,
                         ids=[f"{route} {body}" for route, body, _, _ in ADMIN_MISTAKES])
def test_admin_mistakes_are_a_400_that_changes_nothing(api, route, body, param, message):
    before = api.state()
    r = httpx.post(f"{api.url}{route}", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json() == {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}
    after = api.state()
    assert (after["epoch"], after["members"], after["scale_events"]) == (before["epoch"], before["members"],
                                                                        before["scale_events"])
    assert after["adapt"] == before["adapt"]
