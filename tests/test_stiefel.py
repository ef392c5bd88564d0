import pytest
import torch

from cdcore import stiefel

pytestmark = pytest.mark.usefixtures("f64")


def test_random_point_is_on_manifold_and_batched():
    X = stiefel.random_point(7, 3, 4, 2, generator=torch.Generator().manual_seed(0))
    assert X.shape == (4, 2, 7, 3)
    assert stiefel.feasibility(X).max() < 1e-13
    assert stiefel.constraint(X).shape == (4, 2, 3, 3)


def test_constraint_and_feasibility_values():
    X = 2 * torch.eye(3)[:, :2]
    assert torch.allclose(stiefel.constraint(X), 3 * torch.eye(2))
    assert stiefel.feasibility(X).item() == pytest.approx(3 * 2**0.5)


def test_projx_is_nearest_point_and_fixed_on_manifold():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(3, 8, 4, generator=g)
    P = stiefel.projx(A)
    assert stiefel.feasibility(P).max() < 1e-13
    X = stiefel.random_point(8, 4, generator=g)
    assert torch.allclose(stiefel.projx(X), X, atol=1e-12)
    # no other random point of the manifold is closer
    for _ in range(20):
        Q = stiefel.random_point(8, 4, generator=g)
        assert torch.linalg.matrix_norm(A[0] - P[0]) <= torch.linalg.matrix_norm(A[0] - Q) + 1e-12


def test_projx_float32_is_accurate():
    X = torch.randn(400, 100, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    P = stiefel.projx(X)
    assert P.dtype == torch.float32
    assert stiefel.feasibility(P).item() < 1e-6


def test_proju_is_tangent_and_idempotent():
    g = torch.Generator().manual_seed(2)
    X = stiefel.random_point(9, 4, 5, generator=g)
    U = torch.randn(5, 9, 4, generator=g)
    T = stiefel.proju(X, U)
    skew = X.transpose(-2, -1) @ T
    assert torch.allclose(skew + skew.transpose(-2, -1), torch.zeros(5, 4, 4), atol=1e-12)
    assert torch.allclose(stiefel.proju(X, T), T, atol=1e-12)


def _dense_cayley(X, U, t):
    n = X.shape[0]
    Ut = U - 0.5 * X @ (X.T @ U)
    W = Ut @ X.T - X @ Ut.T
    eye = torch.eye(n)
    return torch.linalg.solve(eye - 0.5 * t * W, (eye + 0.5 * t * W) @ X)


@pytest.mark.parametrize("n,p", [(5, 5), (8, 3), (12, 4), (20, 5)])
def test_retr_cayley_matches_dense_formula_and_stays_feasible(n, p):
    g = torch.Generator().manual_seed(n * 10 + p)
    X = stiefel.random_point(n, p, generator=g)
    U = stiefel.proju(X, torch.randn(n, p, generator=g))
    for t in (1e-3, 0.1, 0.7):
        Y = stiefel.retr_cayley(X, U, t)
        assert torch.allclose(Y, _dense_cayley(X, U, t), atol=1e-11)
        assert stiefel.feasibility(Y).item() < 1e-12
    # first-order: Y(t) = X + t U + O(t^2)
    t = 1e-5
    assert torch.allclose((stiefel.retr_cayley(X, U, t) - X) / t, U, atol=1e-4)


def test_retr_cayley_any_direction_and_near_the_manifold():
    g = torch.Generator().manual_seed(7)
    X = stiefel.random_point(15, 4, generator=g)
    U = torch.randn(15, 4, generator=g)  # not tangent: still the Cayley curve of W = Ũ X^T - X Ũ^T
    for t in (0.05, 0.5, 2.0):
        assert torch.allclose(stiefel.retr_cayley(X, U, t), _dense_cayley(X, U, t), atol=1e-11)
    # off the manifold by delta, the step adds only O(t ||U|| delta) to the infeasibility
    Xd = X + 1e-6 * torch.randn(15, 4, generator=g)
    delta = stiefel.feasibility(Xd).item()
    Y = stiefel.retr_cayley(Xd, 1e-2 * stiefel.proju(X, U))
    assert stiefel.feasibility(Y).item() < 1.1 * delta


def test_retr_cayley_batched_and_tensor_step():
    g = torch.Generator().manual_seed(3)
    X = stiefel.random_point(10, 3, 4, generator=g)
    U = stiefel.proju(X, torch.randn(4, 10, 3, generator=g))
    steps = torch.tensor([0.1, 0.2, 0.3, 0.4])
    Y = stiefel.retr_cayley(X, U, steps)
    for i in range(4):
        assert torch.allclose(Y[i], _dense_cayley(X[i], U[i], float(steps[i])), atol=1e-11)


def test_bad_shapes_raise_one_clear_error():
    with pytest.raises(ValueError, match="n >= p"):
        stiefel.constraint(torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"shape \(\.\.\., n, p\)"):
        stiefel.feasibility(torch.randn(5))
    with pytest.raises(ValueError, match="shape of X"):
        stiefel.proju(torch.randn(5, 3), torch.randn(5, 2))
    with pytest.raises(ValueError, match="n >= p >= 1"):
        stiefel.random_point(2, 3)


_ALL_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# half precision's own rounding of a point of St(12, 4): about sqrt(n p) * eps
_FEAS_TOL = {torch.float16: 2e-2, torch.bfloat16: 1e-1, torch.float32: 1e-5, torch.float64: 1e-12}


@pytest.mark.parametrize("dtype", _ALL_DTYPES, ids=str)
@pytest.mark.parametrize("name", stiefel.__all__)
def test_every_function_accepts_every_floating_dtype(name, dtype):
    """The module promises any floating dtype: each public function runs and keeps the dtype
    (feasibility is float64 by contract; check_point returns None)."""
    g = torch.Generator().manual_seed(0)
    X = stiefel.random_point(12, 4, 2, generator=g, dtype=torch.float64).to(dtype)
    U = stiefel.proju(X.double(), torch.randn(2, 12, 4, generator=g, dtype=torch.float64)).to(dtype)
    out = {
        "check_point": lambda: stiefel.check_point(X),
        "constraint": lambda: stiefel.constraint(X),
        "feasibility": lambda: stiefel.feasibility(X),
        "projx": lambda: stiefel.projx(X),
        "proju": lambda: stiefel.proju(X, U),
        "random_point": lambda: stiefel.random_point(12, 4, 2, generator=g, dtype=dtype),
        "retr_cayley": lambda: stiefel.retr_cayley(X, U, 0.1),
        "sym": lambda: stiefel.sym(X[..., :4, :]),
    }[name]()
    if name == "check_point":
        assert out is None
        return
    assert out.dtype == (torch.float64 if name == "feasibility" else dtype)
    assert torch.isfinite(out).all()
    if name in ("projx", "random_point", "retr_cayley"):
        assert stiefel.feasibility(out).max() < _FEAS_TOL[dtype]
