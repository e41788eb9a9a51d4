import os

import pytest
import torch

from torchrec_esd import ops, reference_ops

INT64_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1


def test_extension_is_loaded():
    # CI must run the real kernels, never the silent fallback.
    if os.environ.get("TORCHREC_ESD_ALLOW_NO_EXTENSION") == "1":
        pytest.skip("extension explicitly allowed to be missing")
    assert ops.EXTENSION_LOADED, f"torchrec_esd._C did not load: {ops.EXTENSION_ERROR}"
    assert hasattr(torch.ops.torchrec_esd, "hash_ids")


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("num_buckets", [0, 1, 7, 1 << 20, 1000003])
def test_hash_matches_reference(dtype, num_buckets):
    hi = INT32_MAX if dtype == torch.int32 else INT64_MAX
    ids = torch.cat(
        [
            torch.randint(0, 1 << 30, (5000,)),
            torch.tensor([0, 1, 2, hi - 1, hi]),
        ]
    ).to(dtype)
    for feature in (0, 1, 25, 1 << 40):
        got = ops.hash_ids(ids, feature, num_buckets)
        want = reference_ops.hash_ids_ref(ids, feature, num_buckets)
        assert got.dtype == torch.int64
        assert torch.equal(got, want)
        if num_buckets:
            assert int(got.min()) >= 0 and int(got.max()) < num_buckets


def test_hash_known_values_are_stable():
    # splitmix64 pinned values: changing the hash silently would re-route PS rows.
    got = ops.hash_ids(torch.tensor([0, 1, 5]), 3, 0)
    assert got.tolist() == [-537132696929009172, 7862637804313477842, -2814969192020637181]


def test_hash_spreads_buckets_and_separates_features():
    ids = torch.arange(100_000)
    b = ops.hash_ids(ids, 0, 16)
    counts = torch.bincount(b, minlength=16).double()
    assert counts.min() > 0.9 * counts.mean() and counts.max() < 1.1 * counts.mean()
    same = (ops.hash_ids(ids, 0, 0) == ops.hash_ids(ids, 1, 0)).float().mean()
    assert same < 1e-3


def test_hash_empty_and_noncontiguous():
    assert ops.hash_ids(torch.empty(0, dtype=torch.int64), 2, 5).numel() == 0
    base = torch.arange(20, dtype=torch.int64)
    strided = base[::2]
    assert not strided.is_contiguous()
    assert torch.equal(ops.hash_ids(strided, 1, 0), ops.hash_ids(strided.contiguous(), 1, 0))


def test_hash_bad_input():
    with pytest.raises(RuntimeError, match="non-negative"):
        ops.hash_ids(torch.tensor([3, -1]), 0, 0)
    with pytest.raises(RuntimeError, match="int32 or int64"):
        ops.hash_ids(torch.tensor([1.0, 2.0]), 0, 0)
    with pytest.raises(RuntimeError, match="1-D"):
        ops.hash_ids(torch.zeros(2, 2, dtype=torch.int64), 0, 0)
    with pytest.raises(RuntimeError, match="num_buckets"):
        ops.hash_ids(torch.tensor([1]), 0, -3)


def test_hash_fake_tensor_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(11, dtype=torch.int32)
        y = torch.ops.torchrec_esd.hash_ids(x, 0, 4)
    assert y.shape == (11,) and y.dtype == torch.int64
