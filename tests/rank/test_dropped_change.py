"""An aborted epoch change whose NIXL READs are still in flight: the rank lets go at once and goes on serving; the
staging memory and its registration are released only once the READs ended (they write into it until then).

A READ that stays in flight for seconds needs a slow link (a GPU shared by two ranks reads at ~0.4 GB/s); on the
CPU the real agent's READs end at once, so these tests drive `PendingReads` with an agent that reports a READ in
flight until the test lets it end."""

from __future__ import annotations

import time

import torch

from eep_hpc.parallel.weight_transfer import PendingReads
from eep_hpc.rank.epochs import _UNRELEASED, EpochChange


class SlowAgent:
    """The part of nixl's agent PendingReads uses; each READ stays "PROC" until `finish()`."""

    def __init__(self):
        self.finished = False
        self.released, self.deregistered, self.removed = [], [], []

    def add_remote_agent(self, metadata):
        return "peer"

    def initialize_xfer(self, op, local, remote, peer):
        return object()

    def transfer(self, handle):
        return "PROC"

    def check_xfer_state(self, handle):
        return "DONE" if self.finished else "PROC"

    def release_xfer_handle(self, handle):
        if not self.finished:
            raise RuntimeError("cannot release a READ in flight")
        self.released.append(handle)

    def remove_remote_agent(self, name):
        self.removed.append(name)

    def deregister(self, reg):
        self.deregistered.append(reg)


def _change_with_reads(agent) -> EpochChange:
    reads = PendingReads(agent, timeout_s=60, like=torch.zeros(1))
    for _ in range(6):  # more pieces than the window: some are still queued
        reads.add(b"md", "local", "remote", nbytes=100)
    change = EpochChange(msg=None)
    change.reads, change.reg, change.staged = reads, "registration", "staging"
    return change


def test_dropping_a_change_never_waits_for_its_reads_and_releases_them_once_they_end():
    agent = SlowAgent()
    change = _change_with_reads(agent)
    reads = change.reads
    # READs in flight: it returns, not released yet (the old drop waited for them up to 10 s in the step loop,
    # and the peers' step agreement timed out meanwhile)
    assert change.drop(agent) is False
    assert change.staged == "staging" and agent.deregistered == []
    assert change.settle(agent) is False  # still in flight
    agent.finished = True
    assert change.settle(agent) is True
    assert agent.deregistered == ["registration"] and change.staged is None
    assert len(agent.released) == 4  # the READs posted (the window); the queued ones were never posted
    assert agent.removed == ["peer"]
    assert change.reads is None and not any(entry[0] is reads for entry in _UNRELEASED)


def test_reads_report_bytes_of_the_pieces_that_ended():
    agent = SlowAgent()
    reads = PendingReads(agent, timeout_s=60, like=torch.zeros(1))
    for _ in range(6):
        reads.add(b"md", "local", "remote", nbytes=100)
    assert not reads.done() and reads.bytes_done == 0
    agent.finished = True
    seen = []
    reads.wait(on_progress=seen.append)
    assert reads.bytes_done == reads.nbytes == 600
    assert seen == sorted(seen) and seen[0] == 400  # the first window's 4 pieces, then the last 2


def test_reads_with_no_piece_ending_fail_after_the_timeout_whatever_their_size():
    agent = SlowAgent()
    reads = PendingReads(agent, timeout_s=0.2, like=torch.zeros(1))
    reads.add(b"md", "local", "remote", nbytes=100)
    time.sleep(0.3)
    try:
        reads.done()
    except RuntimeError as e:
        assert "no piece ended in 0.2 s (0 of 100 bytes in)" in str(e)
    else:
        raise AssertionError("a READ that never ends must fail")


def test_a_change_whose_reads_nixl_cannot_check_keeps_its_staging_registered_for_good():
    class BrokenAgent(SlowAgent):
        def check_xfer_state(self, handle):
            raise RuntimeError("agent gone")

    agent = BrokenAgent()
    change = _change_with_reads(agent)
    reads = change.reads
    assert change.drop(agent) is True  # nothing more to wait for: it cannot be known
    assert agent.deregistered == []  # never handed back while a READ may still write into it
    assert any(entry[0] is reads and entry[1] == "staging" and entry[2] == "registration" for entry in _UNRELEASED)
