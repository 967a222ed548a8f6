import pytest
import torch

from eep_hpc.engine.penalties import apply_penalties
from eep_hpc.engine.sampler import sample
from eep_hpc.engine.sequence import Sequence
from eep_hpc.protocol import SamplingParams
from support import reference_penalties

V = 64


def seqs(n: int, outputs: int = 0, **sampling) -> list[Sequence]:
    return [Sequence(f"r{i}", [1], SamplingParams(**sampling), [0] * outputs) for i in range(n)]


def gen(seed: int = 0, device="cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def test_greedy_is_argmax_and_leaves_logits_alone():
    logits = torch.randn(16, V, generator=gen(1))  # [B, V]
    before = logits.clone()
    assert sample(logits, seqs(16, temperature=0.0), gen()) == logits.argmax(-1).tolist()
    assert torch.equal(logits, before)


def test_top_k_1_is_argmax():
    logits = torch.randn(16, V, generator=gen(2))
    for s in range(5):
        assert sample(logits, seqs(16, temperature=1.5, top_k=1), gen(s)) == logits.argmax(-1).tolist()
        assert sample(logits, seqs(16, top_k=1, seed=s), gen()) == logits.argmax(-1).tolist()


def test_top_k_stays_in_the_k_best():
    logits = torch.randn(1, V, generator=gen(3)).expand(400, V)
    best = set(logits[0].topk(5).indices.tolist())
    drawn = set(sample(logits, seqs(400, temperature=2.0, top_k=5), gen()))
    assert drawn <= best and len(drawn) > 1


def test_top_p_never_leaves_the_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.02, 0.3, 0.1, 0.03])  # nucleus of 0.75: {1, 3}; of 0.85: {1, 3, 4}
    logits = probs.log().expand(300, -1)
    for top_p, nucleus in [(0.75, {1, 3}), (0.85, {1, 3, 4}), (0.3, {1})]:
        seeded = [Sequence(f"r{i}", [1], SamplingParams(top_p=top_p, seed=i)) for i in range(300)]
        for batch in (seqs(300, top_p=top_p), seeded):
            assert set(sample(logits, batch, gen(5))) == nucleus


def test_top_p_on_random_logits():
    logits = torch.randn(200, V, generator=gen(4)) * 3
    for top_p in (0.5, 0.9):
        batch = seqs(200, top_p=top_p, temperature=0.7)
        drawn = sample(logits, batch, gen(6))
        p = (logits.double() / 0.7).softmax(-1)
        for row, token in enumerate(drawn):
            above = p[row][p[row] > p[row, token]].sum().item()  # mass of the tokens more likely than it
            assert above < top_p + 1e-5


def test_seeded_draws_ignore_batch_neighbours():
    logits = torch.randn(8, V, generator=gen(7))  # [B, V]
    alone = sample(logits[3:4], [Sequence("x", [1], SamplingParams(seed=42))], gen(0))
    for neighbours_seed in range(3):
        batch = seqs(8, temperature=0.9, top_p=0.95)
        batch[3] = Sequence("x", [1], SamplingParams(seed=42))
        batch[5].sampling.temperature = 0.0
        assert sample(logits, batch, gen(neighbours_seed))[3] == alone[0]


def test_seeded_request_reproduces_its_stream_even_after_migration():
    logits = torch.zeros(1, 1000)  # uniform: every draw is decided by the generator
    seq = Sequence("a", [1], SamplingParams(seed=3))
    stream = []
    for _ in range(6):
        stream.append(sample(logits, [seq], gen())[0])
        seq.output_token_ids.append(stream[-1])
    fresh = Sequence("a", [1], SamplingParams(seed=3))
    assert sample(logits, [fresh], gen())[0] == stream[0]
    migrated = Sequence("a", [1], SamplingParams(seed=3), output_token_ids=stream[:4])
    assert sample(logits, [migrated], gen())[0] == stream[4]
    assert len(set(stream)) > 1


def test_different_seeds_and_unseeded_draws_differ():
    logits = torch.zeros(1, 1000)
    by_seed = [sample(logits, [Sequence("a", [1], SamplingParams(seed=s))], gen())[0] for s in range(8)]
    assert len(set(by_seed)) > 4
    default = gen(0)
    unseeded = [sample(logits, seqs(1), default)[0] for _ in range(8)]
    assert len(set(unseeded)) > 4


def test_min_tokens_masks_eos_and_stop_tokens():
    logits = torch.zeros(3, V)
    logits[:, 2] = 10.0  # eos
    logits[:, 9] = 9.0  # a stop token
    batch = [
        Sequence("a", [1], SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[9])),
        Sequence("b", [1], SamplingParams(temperature=0, min_tokens=2), [5, 5]),  # reached min_tokens
        Sequence("c", [1], SamplingParams(temperature=0, min_tokens=2, ignore_eos=True)),
    ]
    assert sample(logits, batch, gen(), eos_token_ids=[2]) == [0, 2, 2]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_logits():
    logits = torch.randn(32, V, generator=gen(8)).cuda()
    batch = seqs(32, temperature=0.8, top_k=10, top_p=0.9)
    for i in range(0, 32, 2):
        batch[i].sampling.seed = i
    batch[1].sampling.temperature = 0.0
    tokens = sample(logits, batch, gen(0, "cuda"))
    assert len(tokens) == 32 and tokens[1] == logits[1].argmax().item()
    assert sample(logits[4:5], [batch[4]], gen(1, "cuda")) == [tokens[4]]


# ---- penalties -----------------------------------------------------------------------------------------------


def penalty_batch() -> list[Sequence]:
    g = torch.Generator().manual_seed(11)

    def ids(n: int) -> list[int]:  # few distinct ids, so that tokens repeat
        return torch.randint(0, 12, (n,), generator=g).tolist()

    return [
        Sequence("plain", ids(5), SamplingParams(temperature=0), ids(3)),
        Sequence("all", ids(7), SamplingParams(temperature=0, presence_penalty=0.7, frequency_penalty=0.4,
                                               repetition_penalty=1.6), ids(9)),
        Sequence("rep", ids(4), SamplingParams(temperature=0, repetition_penalty=1.3)),  # prompt tokens only
        Sequence("freq", ids(2), SamplingParams(temperature=0, frequency_penalty=-1.5), ids(12)),
        Sequence("pres", ids(6), SamplingParams(temperature=0, presence_penalty=2.0), ids(1)),
        Sequence("rep<1", ids(3), SamplingParams(temperature=0, repetition_penalty=0.5), ids(4)),
    ]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_penalties_match_a_plain_python_reference(device):
    batch = penalty_batch()
    logits = (torch.randn(len(batch), V, generator=gen(12)) * 4).to(device)  # [B, V], both signs
    got = apply_penalties(logits, batch)
    want = [reference_penalties(row, s.prompt_token_ids, s.output_token_ids, s.sampling)
            for row, s in zip(logits.tolist(), batch)]
    torch.testing.assert_close(got.cpu(), torch.tensor(want), rtol=1e-6, atol=1e-5)
    assert torch.equal(got[0], logits[0])  # no penalty asked: the row is untouched
    # greedy picks from the penalised logits
    assert sample(logits, batch, gen(0, device)) == torch.tensor(want).argmax(-1).tolist()


def test_penalties_come_before_temperature_top_k_and_the_seeded_draw():
    batch = penalty_batch()
    for s in batch:
        s.sampling.temperature, s.sampling.top_k, s.sampling.seed = 0.9, 8, 5
    logits = torch.randn(len(batch), V, generator=gen(13)) * 4
    want = torch.tensor([reference_penalties(row, s.prompt_token_ids, s.output_token_ids, s.sampling)
                         for row, s in zip(logits.tolist(), batch)])
    unpenalised = [Sequence(s.request_id, s.prompt_token_ids, SamplingParams(temperature=0.9, top_k=8, seed=5),
                            s.output_token_ids) for s in batch]
    assert sample(logits, batch, gen()) == sample(want, unpenalised, gen())


def test_a_batch_without_penalties_is_not_touched():
    logits = torch.randn(4, V, generator=gen(14))
    assert apply_penalties(logits, seqs(4, outputs=3, temperature=0)) is logits
