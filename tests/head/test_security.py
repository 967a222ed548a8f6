"""Nobody else on the cluster gets in: signed control messages between head, ranks and node agents; the API key
(on by default in a Slurm head); files with secrets readable by their owner only.

An attacker here is another process without the run's secret: it can connect to the head's ZMQ port and send
well-formed messages (it knows protocol.py), but not sign them."""

from __future__ import annotations

import hmac
import json
import os
import threading
import time
from pathlib import Path

import httpx
import msgspec
import pytest
import zmq

from eep_hpc import protocol as P
from eep_hpc import signing
from eep_hpc.config import Config
from support import start_head, wait_until

PROMPT = "The secret of the cluster is"


def signed(msg, key: bytes, sender: bytes = b"\x07" * 8, counter: int = 1) -> bytes:
    """A frame as signing.encode builds it, but with any key, sender and counter."""
    body = sender + counter.to_bytes(8, "big") + msgspec.msgpack.encode(msg)
    return hmac.digest(key, body, "sha256") + body


# ---- the wire format ------------------------------------------------------------------------------------------


def test_frames_verify_and_every_forgery_is_refused():
    key = signing.ensure_secret()
    msg = P.RankFailed(rank_id=0, error="boom")
    assert signing.decode_for_head(signing.encode(msg)) == msg
    good = signing.encode(msg)
    forged = {
        "unsigned msgpack": msgspec.msgpack.encode(msg),
        "another run's secret": signed(msg, os.urandom(32)),
        "payload changed after signing": good[:-1] + bytes([good[-1] ^ 1]),
        "counter changed after signing": good[:40] + bytes([good[40] ^ 1]) + good[41:],
        "truncated": good[:40],
        "empty": b"",
    }
    for what, frame in forged.items():
        with pytest.raises(signing.BadSignature):
            signing.decode_for_head(frame)
            pytest.fail(what)
    with pytest.raises(signing.BadSignature):  # the head's direction is checked the same way
        signing.decode_for_rank(msgspec.msgpack.encode(P.Shutdown()))
    assert signing.decode_for_head(good) == msg
    with pytest.raises(signing.ReplayedMessage):  # a recorded frame sent again
        signing.decode_for_head(good)
    # frames of one sender may arrive out of order (several threads), each is taken once
    sender = os.urandom(8)
    for n in (5, 3, 4, 1):
        assert signing.decode_for_head(signed(msg, key, sender, n)) == msg
    for n in (3, 5):
        with pytest.raises(signing.ReplayedMessage):
            signing.decode_for_head(signed(msg, key, sender, n))
    assert signing.decode_for_head(signed(msg, key, sender, 5 + signing.REPLAY_WINDOW)) == msg
    with pytest.raises(signing.ReplayedMessage):  # too old to tell
        signing.decode_for_head(signed(msg, key, sender, 2))


def test_identities_and_store_values_need_the_secret():
    signing.ensure_secret()
    ident = signing.rank_identity(0)
    assert ident.startswith(b"rank-0-") and len(ident) > len(b"rank-0-") + 8  # not guessable: b"rank-0" is not it
    sealed = signing.seal("weights/3", b"nixl metadata")
    assert signing.unseal("weights/3", sealed) == b"nixl metadata"
    for name, value in [("weights/3", b"\0" * 32 + b"nixl metadata"),  # written by someone else
                        ("weights/4", sealed),  # moved to another key
                        ("weights/3", sealed[:-1] + b"X")]:  # changed
        with pytest.raises(signing.BadSignature):
            signing.unseal(name, value)


def test_secret_file_is_for_its_owner_only(tmp_path):
    path = signing.write_secret(tmp_path / "control-secret", b"s" * 32)
    assert path.stat().st_mode & 0o777 == 0o600
    assert signing.read_secret(path) == b"s" * 32
    path.chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        signing.read_secret(path)
    with pytest.raises(RuntimeError, match="secret_file"):
        signing.read_secret("")


# ---- the head's socket ---------------------------------------------------------------------------------------


def complete(url: str, max_tokens: int, headers: dict | None = None) -> str:
    body = {"model": "eep-tiny-moe", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=120, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


class Stream:
    """A streamed completion read on a thread: `live` once its first token arrived."""

    def __init__(self, url: str, max_tokens: int):
        self.text, self.finish, self.live = [], None, threading.Event()
        body = {"model": "eep-tiny-moe", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True}
        self.thread = threading.Thread(target=self._read, args=(url, body), daemon=True)
        self.thread.start()
        assert self.live.wait(60), "the stream never started"

    def _read(self, url, body):
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    self.text.append(choice["text"])
                    self.finish = choice["finish_reason"] or self.finish
                    self.live.set()
        self.live.set()

    def result(self) -> tuple[str, str | None]:
        self.thread.join(120)
        return "".join(self.text), self.finish


def snapshot(head) -> dict:
    c = head.head.coordinator
    st = head.state()
    return {"epoch": st["epoch"], "members": st["members"], "scale_events": len(st["scale_events"]),
            "ranks": [(r["rank_id"], r["state"], r["pid"], r["host"]) for r in st["ranks"]],
            "notices": len(c.notices.received)}


def test_forged_control_messages_are_dropped_and_change_nothing(api):
    """A process without the run's secret connects to the coordinator's socket as "rank-0" and sends what a rank
    or node agent would: tokens for a live request, a failure, a leave notice, a finished wave, garbage. None is
    taken; the request's text is exactly the reference; the cluster is as it was."""
    coordinator = api.head.coordinator
    max_tokens = 400  # long enough to still run while the forgeries arrive
    reference = complete(api.url, max_tokens)
    before = snapshot(api)
    stream = Stream(api.url, max_tokens)
    ids = list(coordinator.streams)
    assert ids, "the request finished before the forgeries could be sent"
    forgeries = [
        P.StepOutputs(rank_id=0, outputs=[P.RequestOutput(request_id=i, new_token_ids=[1, 2, 3], finish_reason="stop")
                                          for i in ids], stats=P.RankStats(num_running=99)),
        P.RankFailed(rank_id=0, error="forged failure"),
        P.NodeLeaving(job_id="forged", rank_ids=[0], seconds=1.0, reason="forged notice"),
        P.WaveDone(rank_id=0, wave=coordinator.wave),
        P.PrepareFailed(rank_id=0, epoch=coordinator.epoch, error="forged"),
        P.RankHello(protocol_version=P.PROTOCOL_VERSION + 1, rank_id=0, pid=1, host="attacker", device="cpu"),
    ]
    ctx = zmq.Context()
    socks = []
    for ident in (b"rank-0", b"agent-1-0", b""):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        if ident:
            s.setsockopt(zmq.IDENTITY, ident)
        s.connect(coordinator.address)
        socks.append(s)
    dropped = api.state()["control_messages_dropped"]
    sent = 0
    try:
        for sock in socks:
            for msg in forgeries:
                sock.send(msgspec.msgpack.encode(msg))  # unsigned
                sock.send(signed(msg, os.urandom(32), counter=int(time.time())))  # signed with another secret
            sock.send_multipart([b"two", b"frames"])  # no frame layout may stop the head's receive loop
            sock.send(b"")
            sock.send(os.urandom(1 << 20))
            sent += 2 * len(forgeries) + 3
        # the head has read every one of them, and refused each
        wait_until(lambda: api.state()["control_messages_dropped"] >= dropped + sent, 30,
                   lambda: f"the head refusing all {sent} forged frames (refused: "
                           f"{api.state()['control_messages_dropped'] - dropped})")
        text, finish = stream.result()
    finally:
        for s in socks:
            s.close()
        ctx.term()
    assert (text, finish) == (reference, "length")
    assert api.state()["control_messages_dropped"] == dropped + sent
    assert snapshot(api) == before
    assert coordinator.ranks[0].stats.num_running != 99
    complete(api.url, 8)  # and it keeps serving


def test_the_same_frame_signed_with_the_runs_secret_is_taken(api):
    """The control for the test above: what makes the difference is the signature (this test process holds the
    run's secret, since the head runs in it)."""
    coordinator = api.head.coordinator
    stream = Stream(api.url, 400)
    ids = list(coordinator.streams)
    assert ids, "the request finished before the message could be sent"
    forged = P.StepOutputs(rank_id=0, stats=P.RankStats(), outputs=[
        P.RequestOutput(request_id=i, new_token_ids=[], finish_reason="stop") for i in ids])
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(coordinator.address)
    try:
        sock.send(signing.encode(forged))
        text, finish = stream.result()
    finally:
        sock.close()
        ctx.term()
    assert finish == "stop"  # the stream ended where the signed message said, not at max_tokens


# ---- a rank's socket ---------------------------------------------------------------------------------------------


def test_a_rank_drops_frames_not_from_its_head():
    """Ranks only connect out (nothing listens for the control plane on a rank); should something else answer at the
    head's address (the head gone, its port taken), the rank drops what it is sent unless it is signed."""
    from eep_hpc.rank.process import RankProcess

    signing.ensure_secret()
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    rank = RankProcess(P.RankLaunch(rank_id=7, head_address=f"tcp://127.0.0.1:{port}", model_dir="",
                                    eos_token_ids=[0], device="cpu", config=Config()))
    try:
        rank.send(P.RankHello(protocol_version=P.PROTOCOL_VERSION, rank_id=7, pid=os.getpid(), host="h", device="cpu"))
        assert router.poll(10_000)
        ident, _ = router.recv_multipart()
        heard = rank.last_heard
        for frame in (msgspec.msgpack.encode(P.Shutdown()), signed(P.Shutdown(), os.urandom(32)), b"",
                      signed(P.Shutdown(), os.urandom(32), counter=2)):
            router.send_multipart([ident, frame])
        ping = signing.encode(P.Ping(sent_at=1.0))
        router.send_multipart([ident, ping])
        router.send_multipart([ident, ping])  # replayed: one Pong only
        router.send_multipart([ident, signing.encode(P.Ping(sent_at=2.0))])  # the last frame: the rank has read them all
        pongs = []
        deadline = time.monotonic() + 30
        while not any(m.sent_at == 2.0 for m in pongs):
            assert time.monotonic() < deadline, f"the rank answered {pongs} to its last Ping"
            rank.drain(timeout_ms=100)
            while router.poll(0):
                pongs.append(signing.decode_for_head(router.recv_multipart()[1]))
        assert not rank.stopping
        assert [(type(m), m.sent_at) for m in pongs] == [(P.Pong, 1.0), (P.Pong, 2.0)] and rank.last_heard > heard
        router.send_multipart([ident, signing.encode(P.Shutdown())])
        rank.drain(timeout_ms=5000)
        assert rank.stopping
    finally:
        rank.sock.close(linger=0)
        rank.ctx.term()
        router.close()
        ctx.term()


# ---- the HTTP API ------------------------------------------------------------------------------------------------


def test_local_serve_stays_keyless(api):
    run_dir = Path(api.head.cfg.control.run_dir)
    info = json.loads((run_dir / "head.json").read_text())
    assert info["api_key_file"] == "" and not (run_dir / "api-key").exists()
    assert httpx.get(f"{api.url}/v1/models", timeout=10).status_code == 200
    # the control secret exists all the same, for the owner only
    assert (run_dir / "control-secret").stat().st_mode & 0o777 == 0o600
    assert run_dir.stat().st_mode & 0o777 == 0o700


def test_slurm_head_requires_an_api_key_the_owner_finds(tmp_path, monkeypatch):
    """A head started as a Slurm job (SLURM_JOB_ID set) makes a random API key and admin token, writes them to files
    only its owner reads, keeps them out of what it hands to ranks, and the CLI finds them by the run dir."""
    from eep_hpc.cli import main

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o755)
    run_dir.chmod(0o755)  # as `mkdir -p` in sbatch/head.sh leaves it
    head = start_head(run_dir, ranks=2)
    try:
        info = json.loads((run_dir / "head.json").read_text())
        key_file, token_file = Path(info["api_key_file"]), Path(info["admin_token_file"])
        assert key_file == (run_dir / "api-key").resolve() and token_file == (run_dir / "admin-token").resolve()
        assert run_dir.stat().st_mode & 0o777 == 0o700
        for f in (key_file, token_file, run_dir / "control-secret", run_dir / "head.json"):
            assert f.stat().st_mode & 0o777 == 0o600, f
        key, token = key_file.read_text().strip(), token_file.read_text().strip()
        secret = signing.read_secret(run_dir / "control-secret")

        url = info["api_url"]
        for headers, why in [({}, "Missing API key"), ({"Authorization": "Bearer sk-wrong"}, "Incorrect API key"),
                             ({"Authorization": f"Bearer {token}"}, "Incorrect API key")]:  # the admin token is not it
            for r in (httpx.get(f"{url}/v1/models", headers=headers, timeout=10),
                      httpx.post(f"{url}/v1/completions", headers=headers, timeout=10,
                                 json={"model": head.model, "prompt": "hi", "max_tokens": 2})):
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
                err = r.json()["error"]
                assert err["code"] == "invalid_api_key" and why in err["message"] and err["type"]
        auth = {"Authorization": f"Bearer {key}"}
        assert complete(url, 8, headers=auth)
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200  # probes need no key
        assert httpx.get(f"{url}/admin/state", headers=auth, timeout=10).status_code == 401  # nor is the key the token

        # what ranks get (submitit pickles RankLaunch into run_dir/jobs) holds none of the secrets
        pickles = list((run_dir / "jobs").rglob("*.pkl"))
        assert pickles
        for p in pickles:
            data = p.read_bytes()
            for s in (key.encode(), token.encode(), secret, secret.hex().encode()):
                assert s not in data, p

        # in the TCPStore (no access control): the epoch's group keys under a prefix nobody could guess in advance,
        # NIXL metadata signed
        store = head.head.coordinator.store
        keys = store.list_keys()
        assert any(k.startswith(signing.epoch_store_prefix(0) + "cpu/") for k in keys), keys
        assert not any(k.startswith("0/") for k in keys), keys
        for k in keys:
            if k.startswith(("weights/", "experts/")):
                signing.unseal(k, store.get(k))

        # the owner's CLI finds the key and the token through the run dir
        assert main(["status", "--run-dir", str(run_dir), "--json"]) == 0
        result = tmp_path / "bench.json"
        assert main(["bench", "--run-dir", str(run_dir), "--num-prompts", "2", "--random-input-len", "4",
                     "--random-output-len", "4", "--result-file", str(result)]) == 0
        assert json.loads(result.read_text())["completed"] == 2
    finally:
        head.stop()


def test_an_api_key_without_an_admin_token_still_guards_admin(tmp_path, caplog):
    """serve.api_key set, serve.admin_token not: /admin/* (scaling included) is not left open; a random token goes
    to RUN_DIR/admin-token (mode 600), the log says where, and the CLI finds it through the run dir."""
    from eep_hpc.cli import main

    run_dir = tmp_path / "run"
    with caplog.at_level("INFO", logger="eep_hpc.head"):
        head = start_head(run_dir, ranks=1, serve={"api_key": "sk-mine"})
    try:
        token_file = run_dir / "admin-token"
        assert token_file.stat().st_mode & 0o777 == 0o600
        token = token_file.read_text().strip()
        assert token and token != "sk-mine"
        assert [r for r in caplog.records if "admin token" in r.getMessage() and str(token_file) in r.getMessage()]
        info = json.loads((run_dir / "head.json").read_text())
        assert Path(info["admin_token_file"]).resolve() == token_file.resolve()

        for path, headers in [("/admin/state", {}), ("/admin/state", {"Authorization": "Bearer sk-mine"}),
                              ("/admin/scale/grow", {})]:
            r = (httpx.get if path.endswith("state") else httpx.post)(f"{head.url}{path}", headers=headers, timeout=10,
                                                                     **({} if path.endswith("state") else {"json": {"n": 1}}))
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, r.text)
            err = r.json()["error"]
            assert err["code"] == "invalid_api_key" and err["message"] and err["type"]
        r = httpx.get(f"{head.url}/admin/state", headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert r.status_code == 200 and r.json()["epoch"] == 0
        assert main(["status", "--run-dir", str(run_dir), "--json"]) == 0
    finally:
        head.stop()
