"""The key space: one decode of a batch, PS blocks, row formats, one bad-id error."""

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_esd.config import EsdConfigError
from torchrec_esd.layout import EsdIdError, KeySpace


def _tables():
    return [
        EmbeddingBagConfig(name="ta", embedding_dim=4, num_embeddings=10, feature_names=["fa", "fb"]),
        EmbeddingBagConfig(name="tb", embedding_dim=2, num_embeddings=7, feature_names=["fc"]),
    ]


def _kjt():
    lengths = [2, 1, 0, 1, 1, 1, 1, 2, 2]  # feature-major: fa(s0,s1,s2), fb(...), fc(...)
    values = [1, 1, 2] + [3, 1, 7] + [5, 0, 0, 5, 0]
    return KeyedJaggedTensor(
        keys=["fa", "fb", "fc"],
        values=torch.tensor(values, dtype=torch.int64),
        lengths=torch.tensor(lengths, dtype=torch.int32),
    )


def test_keys_offsets_and_formats():
    ks = KeySpace(_tables(), num_ps=2, state_dim=1)
    assert ks.offsets.tolist() == [0, 10, 17] and ks.total_rows == 17
    assert ks.uniform_dim is None and ks.max_dim == 4
    assert [f.row_bytes for f in ks.formats] == [4 * 4 + 4, 2 * 4 + 4]
    assert ks.keys(1, torch.tensor([0, 6])).tolist() == [10, 16]
    assert ks.table_of(torch.tensor([0, 9, 10, 16])).tolist() == [0, 0, 1, 1]
    assert ks.ids_of(torch.tensor([9, 12])).tolist() == [9, 2]
    assert ks.dim_of(torch.tensor([3, 12])).tolist() == [4, 2]


def test_locate_is_row_wise_blocks_table_after_table():
    ks = KeySpace(_tables(), num_ps=2)
    # ta: block 5 -> PS0 ids 0-4, PS1 ids 5-9; tb: block 4 -> PS0 ids 0-3, PS1 ids 4-6
    p, local = ks.locate(torch.arange(17))
    assert p.tolist() == [0] * 5 + [1] * 5 + [0] * 4 + [1] * 3
    assert local.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 7, 8, 5, 6, 7]
    assert ks.ps_rows.tolist() == [9, 8]
    # every (PS, local row) is used once: the blocks tile each PS's storage
    pairs = set(zip(p.tolist(), local.tolist()))
    assert len(pairs) == 17


def test_decode_once_kjt_and_sample_major_order():
    ks = KeySpace(_tables())
    kjt = _kjt()
    bk = ks.decode(kjt)
    assert ks.decode(kjt) is bk  # the same KJT object is decoded once
    assert bk.keys.tolist() == [1, 1, 2, 3, 1, 7, 15, 10, 10, 15, 10]
    assert bk.sample.tolist() == [0, 0, 1, 0, 1, 2, 0, 1, 1, 2, 2]
    keys, offsets = bk.sample_major()
    assert offsets.tolist() == [0, 4, 8, 11]
    assert keys.tolist() == [1, 1, 3, 15, 2, 1, 10, 10, 7, 15, 10]
    assert bk.distinct().tolist() == [1, 2, 3, 7, 10, 15]
    # a brute-force sample-major order for a fixed-length (one-hot) batch takes the reshape path
    onehot = KeyedJaggedTensor(keys=["fa", "fc"], values=torch.tensor([1, 2, 3, 4, 5, 6]),
                               lengths=torch.ones(6, dtype=torch.int32))
    k2, o2 = ks.decode(onehot).sample_major()
    assert k2.tolist() == [1, 14, 2, 15, 3, 16] and o2.tolist() == [0, 2, 4, 6]


def test_one_error_type_for_bad_ids():
    ks = KeySpace(_tables())
    bad = KeyedJaggedTensor(keys=["fa", "fc"], values=torch.tensor([1, 7]), lengths=torch.tensor([1, 1]))
    with pytest.raises(EsdIdError, match="'fc': id 7 is outside table 'tb' of 7 rows"):
        ks.decode(bad)
    neg = KeyedJaggedTensor(keys=["fa"], values=torch.tensor([-1]), lengths=torch.tensor([1]))
    with pytest.raises(EsdIdError, match="'fa': id -1"):
        ks.decode(neg)
    unknown = KeyedJaggedTensor(keys=["fz"], values=torch.tensor([0]), lengths=torch.tensor([1]))
    with pytest.raises(EsdIdError, match="'fz' has no embedding table"):
        ks.decode(unknown)
    floats = KeyedJaggedTensor(keys=["fa"], values=torch.tensor([1.0]), lengths=torch.tensor([1]))
    with pytest.raises(EsdIdError, match="int32/int64"):
        ks.decode(floats)
    # callers that catch the config error (or ValueError) still do
    assert issubclass(EsdIdError, EsdConfigError) and issubclass(EsdIdError, ValueError)


def test_bad_table_sets():
    with pytest.raises(EsdConfigError, match="empty"):
        KeySpace([])
    t = _tables()
    with pytest.raises(EsdConfigError, match="same name"):
        KeySpace([t[0], t[0]])
    twice = EmbeddingBagConfig(name="tc", embedding_dim=4, num_embeddings=3, feature_names=["fa"])
    with pytest.raises(EsdConfigError, match="'fa' is mapped to two tables"):
        KeySpace([t[0], twice])
