"""The C++ inputs of the esd dispatcher (torchrec_esd::dedup_inputs) against the
PyTorch / numpy path (CostModel.dedup_cost, DedupCost.additive_matrix): the same
arrays, bit for bit, on batches of the iid and sessions workloads read against
cache states that fill, evict and hold dirty and outdated rows (staleness 0 and
1, W = 4 and 3), on a batch whose bags are all empty, and bad inputs raise."""

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_esd import ops
from torchrec_esd.dispatch import make_dispatcher

from test_dedup_start_op import workload_world  # noqa: E402  (tests/ is on sys.path under pytest)

needs_op = pytest.mark.skipif(not ops.HAS_DEDUP_INPUTS, reason="extension without dedup_inputs")

FIELDS = ("occ_s", "occ_k", "pull", "push", "owner", "owner_push", "uses")


def _assert_same(native, ref):
    (d, add), (rd, radd) = native, ref
    assert (d.num_samples, d.num_workers, d.num_keys) == (rd.num_samples, rd.num_workers, rd.num_keys)
    for f in FIELDS:
        a, b = getattr(d, f), getattr(rd, f)
        assert a.dtype == b.dtype and a.shape == b.shape, f
        np.testing.assert_array_equal(a, b, err_msg=f)
    assert add.dtype == radd.dtype and add.shape == radd.shape
    np.testing.assert_array_equal(add, radd)


@needs_op
@pytest.mark.parametrize("workload", ["iid", "sessions"])
@pytest.mark.parametrize("bandwidths,staleness", [([1000.0, 100.0, 50.0, 10.0], 0), ([1000.0, 300.0, 10.0], 1)])
def test_equals_the_reference_on_workload_batches(workload, bandwidths, staleness):
    wl, _, config, cm, directory = workload_world(workload, bandwidths,
                                                  ["--staleness", str(staleness), "--cache-ratio", "0.05"])
    B = 192
    shares = [int(s) for s in config.batch_shares(B)]
    esd = make_dispatcher("esd")
    seen = {"owner": 0, "outdated": 0, "evict": 0}
    for step in range(8):
        kjt = wl.global_batch(step, B).sparse_features
        state = directory.cache_state()
        ref = cm.dedup_inputs(kjt, state, native=False)
        native = cm.dedup_inputs(kjt, state, native=True)
        _assert_same(native, ref)
        st = cm._state(kjt, state)
        seen["owner"] += int((native[0].owner >= 0).sum())
        seen["outdated"] += int((st.cached & st.outdated).sum())
        seen["evict"] += int(bool((cm._evict_fraction(st) > 0).any()))
        # dedup_cost and HybridDis's expected matrix read the native arrays too
        _assert_same((cm.dedup_cost(kjt, state), ref[1]), ref)
        np.testing.assert_array_equal(cm.expected_matrix(kjt, state, shares).numpy(),
                                      ref[0].amortised_matrix(shares))
        # what esd reads by default is the native one
        cost, aux = esd.inputs(cm, kjt, state)
        np.testing.assert_array_equal(cost.numpy(), ref[1])
        directory.plan(kjt, esd.assign(cost, shares, aux=aux).assignment)
    # the batches exercised every branch: dirty owners, outdated copies, full caches
    assert seen["owner"] > 0 and seen["evict"] > 0
    assert seen["outdated"] > 0 or staleness == 0


@needs_op
def test_a_batch_without_keys_and_bad_inputs():
    wl, _, _, cm, directory = workload_world("iid", [100.0, 10.0])
    kjt = wl.global_batch(0, 8).sparse_features
    empty = KeyedJaggedTensor.from_lengths_sync(
        keys=kjt.keys(), values=torch.zeros(0, dtype=torch.int64),
        lengths=torch.zeros(len(kjt.keys()) * 8, dtype=torch.int32))
    state = directory.cache_state()
    _assert_same(cm.dedup_inputs(empty, state, native=True), cm.dedup_inputs(empty, state, native=False))
    directory.plan(kjt, torch.arange(8) % 2)  # some rows cached: hits to corrupt
    kjt = wl.global_batch(1, 8).sparse_features
    state = directory.cache_state()
    st = cm._state(kjt, state)
    h = st.look.hits
    assert h.worker.numel() > 0
    rt = cm.row_time
    good = (st.keys, st.offsets, st.slots, st.table_of, h.worker, h.key, h.outdated, h.dirty,
            st.occupied, st.ndirty, st.cap, rt)
    ops.dedup_inputs(*good)
    bad = {
        0: st.keys.int(),  # keys not int64
        1: st.offsets[:-1],  # offsets not ending at the keys' count
        3: st.table_of + rt.shape[1],  # a table outside [0, T)
        4: h.worker + rt.shape[0],  # a hit on a worker outside [0, W)
        5: h.key[:-1],  # hits of different lengths
        6: h.outdated.long(),  # flags not bool
        8: st.occupied[:, :-1],  # occupancy of another shape
        11: rt.float(),  # row_time not float64
    }
    for i, v in bad.items():
        args_ = list(good)
        args_[i] = v
        with pytest.raises(RuntimeError, match="torchrec_esd::dedup_inputs"):
            ops.dedup_inputs(*args_)
