"""Shared assertions of the equivalence tests: ESD / DES against vanilla TorchRec."""

import torch


def assert_close_rel(a: torch.Tensor, b: torch.Tensor, what: str, rtol: float = 1e-5) -> None:
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-12)
    err = float((a - b).abs().max())
    assert err <= rtol * scale, f"{what}: max abs diff {err:.3g} > {rtol} x {scale:.3g}"


def assert_same_model(vanilla: dict, results: list, num_workers: int) -> None:
    """``results`` (per rank, rank 0 first) trained the model of ``vanilla``
    (rank 0's result): same losses per step, final tables and dense weights
    within 1e-5 relative, and the same dense weights on every worker."""
    other = results[0]
    assert_close_rel(torch.tensor(vanilla["losses"]), torch.tensor(other["losses"]), "losses")
    for name in vanilla["tables"]:
        assert_close_rel(vanilla["tables"][name], other["tables"][name], f"table {name}")
    for name in vanilla["dense"]:
        assert_close_rel(vanilla["dense"][name], other["dense"][name], f"dense {name}")
    for r in range(1, num_workers):
        for name in other["dense"]:
            assert torch.equal(results[r]["dense"][name], other["dense"][name])
