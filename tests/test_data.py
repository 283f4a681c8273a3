import numpy as np
import pytest
import torch

from dstlm.data import BlockDataset, ResumableBatchSampler, load_documents, load_tokenizer, pack
from dstlm.data.packing import build_packed, split_and_stream


def test_bpe_round_trip(small_corpus):
    tok = load_tokenizer("bpe", small_corpus, 512)
    assert tok.vocab_size == 512
    text = open(small_corpus[0]).read()[:5000] + "  odd   spacing\tand ünïcödé 日本 <|endoftext|>"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|endoftext|>") == [tok.eos_id]


def test_gpt2_tokenizer_is_the_real_one():
    tok = load_tokenizer("gpt2")
    assert tok.vocab_size == 50257 and tok.eos_id == 50256
    assert tok.encode("Hello world") == [15496, 995]  # GPT-2 ids


def test_tokenizer_errors():
    with pytest.raises(FileNotFoundError, match="data.tokenizer='nope/missing' not found"):
        load_tokenizer("nope/missing")


def test_packing_round_trip(small_corpus):
    tok = load_tokenizer("bpe", small_corpus, 512)
    docs = load_documents(small_corpus)
    assert len(docs) == 2 and docs[0] == open(small_corpus[0]).read()
    token_docs = [tok.encode(d) + [tok.eos_id] for d in docs]
    train, val = split_and_stream(token_docs, 0.1)
    assert len(train) + len(val) == sum(map(len, token_docs))
    blocks = pack(train, 32)
    # consecutive blocks share one token and together re-create the stream prefix
    assert (blocks[:-1, -1] == blocks[1:, 0]).all()
    rebuilt = np.concatenate([blocks[0]] + [b[1:] for b in blocks[1:]])
    assert (rebuilt == train[: len(rebuilt)]).all()
    assert len(train) - len(rebuilt) < 32
    # decoding the train stream gives back the documents' heads, in order
    text = tok.decode(train[:200].tolist())
    assert docs[0].startswith(text)
    x, y = BlockDataset(blocks)[3]
    assert x.dtype == torch.int64 and x.shape == (32,) and (x[1:] == y[:-1]).all()


def test_packed_cache_is_reused(small_corpus):
    tok = load_tokenizer("bpe", small_corpus, 512)
    calls = []

    def loader():
        calls.append(1)
        return load_documents(small_corpus)

    a = build_packed("k|" + "|".join(small_corpus), loader, tok, 48, 0.05)
    b = build_packed("k|" + "|".join(small_corpus), loader, tok, 48, 0.05)
    assert len(calls) <= 1 and np.array_equal(a.train, b.train) and a.val.shape[1] == 49


def test_order_deterministic_by_seed():
    a = list(ResumableBatchSampler(100, 4, seed=1, total_batches=50))
    b = list(ResumableBatchSampler(100, 4, seed=1, total_batches=50))
    c = list(ResumableBatchSampler(100, 4, seed=2, total_batches=50))
    assert a == b and a != c
    assert a[:25] != a[25:]  # the second data epoch is reshuffled
    for epoch in (a[:25], a[25:]):
        assert sorted(i for batch in epoch for i in batch) == list(range(100))  # each item once per epoch


def test_global_batches_independent_of_world_size():
    one = list(ResumableBatchSampler(64, 8, seed=3, total_batches=20))
    two = [list(ResumableBatchSampler(64, 4, seed=3, rank=r, world_size=2, total_batches=20)) for r in range(2)]
    for b, batch in enumerate(one):
        assert batch == two[0][b] + two[1][b]


def test_sampler_resume_continues_exactly():
    stream = list(ResumableBatchSampler(80, 4, seed=5, total_batches=60))  # three data epochs of 20
    for consumed in (0, 7, 19, 20, 33, 60):
        s = ResumableBatchSampler(80, 4, seed=5, total_batches=60)
        s.resume(consumed)
        assert len(s) == 60  # Lightning counts from its restored batch index
        assert list(s) == stream[consumed:] and list(s) == stream[consumed:], consumed  # iter() has no side effects


def test_sampler_bad_input():
    with pytest.raises(ValueError, match="batch_size=0 must be positive"):
        ResumableBatchSampler(10, 0, seed=0)
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        ResumableBatchSampler(10, 8, seed=0, world_size=2)
