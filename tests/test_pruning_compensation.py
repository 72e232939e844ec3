"""Structured OBS: compensating a consumer matrix for removed input columns."""

import pytest
import torch

from efficientllm.pruning.compensation import (
    damped_inverse,
    obs_remove_columns,
    obs_step,
    obs_update,
    reconstruction_error,
    removal_errors,
    slice_hessian,
)

IN, OUT = 24, 10


def correlated_inputs(n: int, seed: int) -> torch.Tensor:
    """Inputs X [n, IN] driven by 6 latent factors plus a little noise (strongly correlated,
    like real activations); the mixing is fixed, the samples depend on `seed`."""
    mixing = torch.randn(6, IN, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, 6, generator=g, dtype=torch.float64)
    return latent @ mixing + 0.1 * torch.randn(n, IN, generator=g, dtype=torch.float64)


def weight(dtype=torch.float64) -> torch.Tensor:
    return torch.randn(OUT, IN, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(
        dtype
    )


REMOVE = torch.tensor([2, 3, 11, 17])


def test_obs_lowers_the_reconstruction_error_on_held_out_inputs():
    X_train, X_test = correlated_inputs(512, seed=2), correlated_inputs(512, seed=3)
    W = weight()
    result = obs_remove_columns(W, X_train.T @ X_train, REMOVE)
    assert result.compensated
    sliced = W[:, result.keep]
    obs_error = reconstruction_error(W, result.weight, X_test, result.keep)
    slice_error = reconstruction_error(W, sliced, X_test, result.keep)
    assert obs_error < 0.5 * slice_error


def test_obs_without_damping_is_the_least_squares_optimum_of_the_kept_columns():
    X = correlated_inputs(256, seed=4)
    W = weight()
    result = obs_remove_columns(W, X.T @ X, REMOVE, damping=0.0)
    X_keep = X[:, result.keep]
    optimum = torch.linalg.lstsq(X_keep, X @ W.T).solution.T
    torch.testing.assert_close(result.weight, optimum, rtol=1e-7, atol=1e-8)


def test_removing_structures_one_after_another_equals_removing_their_union():
    X = correlated_inputs(256, seed=5)
    W, H = weight(), X.T @ X
    at_once = obs_remove_columns(W, H, REMOVE)

    first = obs_remove_columns(W, H, torch.tensor([3, 17]))
    # Columns 2 and 11 of the original W, in the kept numbering of the first step.
    second_remove = torch.tensor([first.keep.tolist().index(c) for c in (2, 11)])
    second = obs_step(first.weight, first.hinv, second_remove)

    assert torch.equal(first.keep[second.keep], at_once.keep)
    torch.testing.assert_close(second.weight, at_once.weight, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(second.hinv, at_once.hinv, rtol=1e-9, atol=1e-12)


def test_downdated_inverse_is_the_inverse_of_the_kept_damped_hessian():
    X = correlated_inputs(256, seed=6)
    H = X.T @ X
    hinv, _ = damped_inverse(H, damping=0.01)
    result = obs_step(weight(), hinv, REMOVE)
    lam = 0.01 * H.diagonal().mean()
    kept = slice_hessian(H, result.keep) + lam * torch.eye(IN - len(REMOVE), dtype=H.dtype)
    torch.testing.assert_close(result.hinv, torch.linalg.inv(kept), rtol=1e-8, atol=1e-12)


def test_a_zero_hessian_falls_back_to_plain_slicing_with_a_reason():
    W = weight()
    result = obs_remove_columns(W, torch.zeros(IN, IN), REMOVE)
    assert not result.compensated
    assert "no data" in result.fallback
    assert result.hinv is None
    assert torch.equal(result.weight, W[:, result.keep])
    assert not torch.isnan(result.weight).any()


def test_a_non_finite_hessian_falls_back_to_plain_slicing():
    H = torch.eye(IN)
    H[0, 0] = float("nan")
    result = obs_remove_columns(weight(), H, REMOVE)
    assert not result.compensated and "non-finite" in result.fallback


def test_dead_inputs_are_handled_by_the_damping():
    X = correlated_inputs(256, seed=8)
    X[:, 5] = 0.0  # an input that never fires: H is singular
    result = obs_remove_columns(weight(), X.T @ X, REMOVE)
    assert result.compensated and torch.isfinite(result.weight).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_weight_comes_back_in_its_own_dtype(dtype):
    X = correlated_inputs(128, seed=9)
    result = obs_remove_columns(weight(dtype), (X.T @ X).float(), REMOVE)
    assert result.weight.dtype == dtype
    assert result.hinv.dtype == torch.float64


def test_removing_nothing_returns_the_weight_unchanged():
    X = correlated_inputs(128, seed=10)
    W = weight()
    result = obs_remove_columns(W, X.T @ X, torch.tensor([], dtype=torch.long))
    assert torch.equal(result.weight, W)
    assert result.keep.tolist() == list(range(IN))


def test_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError, match="do not match"):
        obs_remove_columns(weight(), torch.eye(IN + 1), REMOVE)


def test_the_update_from_one_cholesky_factor_equals_the_full_inverse_path():
    X = correlated_inputs(256, seed=6)
    H, W = X.T @ X, weight()
    update, reason = obs_update(H, REMOVE)
    assert reason is None
    full = obs_remove_columns(W, H, REMOVE)
    torch.testing.assert_close(update.apply(W), full.weight, rtol=1e-9, atol=1e-12)
    assert torch.equal(update.keep, full.keep)


def test_the_update_is_row_local_so_a_block_of_rows_compensates_alone():
    X = correlated_inputs(256, seed=7)
    update, _ = obs_update(X.T @ X, REMOVE)
    W = weight()
    whole = update.apply(W)
    torch.testing.assert_close(update.apply(W[3:7]), whole[3:7], rtol=1e-12, atol=1e-14)
    assert not torch.allclose(whole, W[:, update.keep])  # it does compensate


def test_the_update_reports_a_hessian_without_data():
    update, reason = obs_update(torch.zeros(IN, IN), REMOVE)
    assert update is None and "no data" in reason


def test_removal_errors_are_each_groups_output_error_before_and_after_its_obs_update():
    X, W = correlated_inputs(400, seed=3), weight()
    groups = torch.tensor([[2, 3], [11, 17], [0, 23]])
    before, after = removal_errors(W, X.T @ X, groups, damping=1e-10)
    for g, columns in enumerate(groups):
        plain = (X[:, columns] @ W[:, columns].T).square().sum()
        compensated = obs_remove_columns(W, X.T @ X, columns, damping=1e-10)
        left = reconstruction_error(W, compensated.weight, X, compensated.keep) ** 2
        assert float(before[g]) == pytest.approx(float(plain), rel=1e-6)
        assert float(after[g]) == pytest.approx(left, rel=1e-6)
        assert float(after[g]) < 0.5 * float(before[g]), "correlated inputs: OBS repairs most of it"
    assert removal_errors(W, torch.zeros(IN, IN, dtype=torch.float64), groups) is None
