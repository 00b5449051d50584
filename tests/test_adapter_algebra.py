"""The algebra of ``ContextAdapter`` checked against dense ΔW, and every way two adapters can fail to fit.

Every property compares the factored result with the same computation on the dense matrices
ΔW = scale · B A of each module. Adapters here are small (d ≤ 7, r ≤ 4) and float64, so exact identities
hold to ~1e-12; hypothesis draws seeds, ranks and scales.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ctx2param import ContextAdapter, compose, stack
from ctx2param.adapter import LoraFactors
from ctx2param.errors import AdapterMismatchError

# Three modules of different shapes, ``{name: (d_out, d_in)}``: square, "k_proj"-like narrow, wide.
SHAPES: dict[str, tuple[int, int]] = {
    "model.layers.0.self_attn.q_proj": (6, 5),
    "model.layers.0.self_attn.k_proj": (3, 5),
    "model.layers.0.mlp.down_proj": (5, 7),
}
TOL = {"rtol": 1e-10, "atol": 1e-10}

PROPERTY = settings(max_examples=20, deadline=None, derandomize=True)
seeds = st.integers(0, 10_000)
ranks = st.integers(1, 4)
scales = st.floats(-3.0, 3.0, allow_nan=False).filter(lambda s: abs(s) > 1e-3)


def make(seed: int, rank: int = 2, scale: float = 1.0, batch: int | None = None, **kwargs) -> ContextAdapter:
    """A float64 random adapter on :data:`SHAPES` (A, B ~ N(0, 1)); with ``batch``, ``A [batch, r, d_in]``.
    ``kwargs`` go to ``ContextAdapter.random`` (e.g. ``base_model``)."""
    settings = {"rank": rank, "scale": scale, "std": 1.0, "dtype": torch.float64, **kwargs}
    if batch is None:
        return ContextAdapter.random(SHAPES, seed=seed, **settings)
    return stack([ContextAdapter.random(SHAPES, seed=seed + i, **settings) for i in range(batch)])


def dense(adapter: ContextAdapter) -> dict[str, torch.Tensor]:
    """``{name: ΔW}``, computed here from the factors (not with the library's ``delta_weight``)."""
    return {name: f.scale * (f.B @ f.A) for name, f in adapter.items()}


def assert_dense_equal(got: ContextAdapter | dict, want: dict[str, torch.Tensor], **tol) -> None:
    got = dense(got) if isinstance(got, ContextAdapter) else got
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], **(tol or TOL))


def frobenius_dot(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ_modules ⟨ΔW_x, ΔW_y⟩ on dense matrices (sums the last two dims, keeps a batch dim)."""
    return sum((x[n] * y[n]).sum((-2, -1)) for n in x)


# ------------------------------------------------------------------------------------------- properties
@PROPERTY
@given(seeds, seeds, ranks, ranks, scales, scales)
def test_add_is_commutative_and_exact(sa, sb, ra, rb, ca, cb):
    a, b = make(sa, ra, ca), make(sb, rb, cb)
    want = {n: dense(a)[n] + dense(b)[n] for n in SHAPES}
    assert_dense_equal(a + b, want)
    assert_dense_equal(b + a, want)
    assert (a + b).rank == ra + rb  # ranks concatenate, nothing is approximated


@PROPERTY
@given(seeds, ranks, ranks, ranks, scales, scales, scales)
def test_add_is_associative(seed, ra, rb, rc, ca, cb, cc):
    a, b, c = make(seed, ra, ca), make(seed + 1, rb, cb), make(seed + 2, rc, cc)
    assert_dense_equal((a + b) + c, dense(a + (b + c)))
    assert_dense_equal((a + b) + c, {n: dense(a)[n] + dense(b)[n] + dense(c)[n] for n in SHAPES})


@PROPERTY
@given(seeds, seeds, ranks, ranks, scales, scales)
def test_subtracting_what_was_added_gives_back_the_adapter(sa, sb, ra, rb, ca, cb):
    a, b = make(sa, ra, ca), make(sb, rb, cb)
    assert_dense_equal((a + b) - b, dense(a))
    assert_dense_equal(a - a, {n: torch.zeros(s, dtype=torch.float64) for n, s in SHAPES.items()})


@PROPERTY
@given(seeds, ranks, scales, st.floats(-5.0, 5.0, allow_nan=False))
def test_scaling(seed, rank, scale, c):
    a = make(seed, rank, scale)
    assert_dense_equal(1 * a, dense(a))
    assert_dense_equal(1.0 * a, dense(a))
    assert_dense_equal(-1 * a, {n: -w for n, w in dense(a).items()})
    assert_dense_equal(-a, {n: -w for n, w in dense(a).items()})
    assert_dense_equal(c * a, {n: c * w for n, w in dense(a).items()})
    assert_dense_equal(a * c, {n: c * w for n, w in dense(a).items()})
    assert_dense_equal(
        torch.tensor(c, dtype=torch.float64) * a, {n: c * w for n, w in dense(a).items()}
    )  # 0-d tensor: a scalar
    if abs(c) > 1e-3:
        assert_dense_equal(a / c, {n: w / c for n, w in dense(a).items()})
    assert_dense_equal(0 * a, {n: torch.zeros_like(w) for n, w in dense(a).items()})


@PROPERTY
@given(st.lists(st.tuples(seeds, ranks, scales), min_size=1, max_size=5))
def test_sum_of_a_list(specs):
    adapters = [make(*spec) for spec in specs]
    want = {n: sum(dense(a)[n] for a in adapters) for n in SHAPES}
    total = sum(adapters)
    assert isinstance(total, ContextAdapter)
    assert_dense_equal(total, want)
    assert total.rank == sum(r for _, r, _ in specs)


@PROPERTY
@given(
    st.lists(st.tuples(seeds, ranks, scales, st.floats(-2.0, 2.0, allow_nan=False)), min_size=1, max_size=4)
)
def test_compose_is_the_weighted_sum(specs):
    adapters = [make(seed, rank, scale) for seed, rank, scale, _ in specs]
    weights = [w for *_, w in specs]
    want = {n: sum(w * dense(a)[n] for a, w in zip(adapters, weights, strict=True)) for n in SHAPES}
    assert_dense_equal(compose(adapters, weights), want)
    assert_dense_equal(
        compose(adapters, weights), dense(sum(w * a for a, w in zip(adapters, weights, strict=True)))
    )
    assert_dense_equal(compose(adapters), {n: sum(dense(a)[n] for a in adapters) for n in SHAPES})


@PROPERTY
@given(
    st.lists(st.tuples(seeds, ranks, scales, st.floats(-2.0, 2.0, allow_nan=False)), min_size=2, max_size=6),
    st.integers(0, 5),
)
def test_compose_equals_the_chain_of_additions_with_a_batched_adapter_among_singles(specs, batched_at):
    """One concatenation per module gives the ΔW, rank, batch and base of ``w0·a0 + w1·a1 + ...``."""
    batched_at %= len(specs)
    adapters = [
        make(seed, rank, scale, batch=3 if i == batched_at else None, base_model="org/base" if i else None)
        for i, (seed, rank, scale, _) in enumerate(specs)
    ]
    weights = [w for *_, w in specs]
    chain = adapters[0] * weights[0]
    for adapter, weight in zip(adapters[1:], weights[1:], strict=True):
        chain = chain + adapter * weight
    got = compose(adapters, weights)
    assert_dense_equal(got, dense(chain))
    assert got.batch_size == 3 and got.rank == sum(r for _, r, _, _ in specs)
    assert got.base_model == "org/base"  # the first names none: the first that names one


@PROPERTY
@given(st.lists(st.tuples(seeds, ranks, scales), min_size=1, max_size=3), st.integers(0, 3))
def test_compress_is_exact_when_the_rank_fits(specs, extra):
    adapter = sum(make(*spec) for spec in specs)
    total_rank = adapter.rank
    small = adapter.compress(total_rank + extra)
    assert_dense_equal(small, dense(adapter), rtol=1e-9, atol=1e-9)
    # The rank never exceeds min(d_out, d_in) nor the requested rank, and is at most what was there.
    for name, f in small.items():
        d_out, d_in = SHAPES[name]
        assert f.rank <= min(total_rank, d_out, d_in)
    assert small.dtype == adapter.dtype


def _adapter_with_singular_values(seed: int, sv: dict[str, list[float]]) -> ContextAdapter:
    """ΔW = U diag(s) Vᵀ per module with chosen singular values, split into random non-orthogonal factors."""
    gen = torch.Generator().manual_seed(seed)
    factors = {}
    for name, (d_out, d_in) in SHAPES.items():
        s = torch.tensor(sv[name], dtype=torch.float64)
        r = len(s)
        u, _ = torch.linalg.qr(torch.randn(d_out, r, generator=gen, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(d_in, r, generator=gen, dtype=torch.float64))
        mix = torch.randn(r, r, generator=gen, dtype=torch.float64) + 3 * torch.eye(r, dtype=torch.float64)
        B = u * s  # [d_out, r]
        A = v.T  # [r, d_in], so B A = U diag(s) Vᵀ
        # Scramble the factors (B M⁻¹)(M A) without changing their product; the scale 2 · 0.5 cancels.
        factors[name] = LoraFactors(mix @ A, 2.0 * B @ torch.linalg.inv(mix), 0.5)
    return ContextAdapter(factors)


@PROPERTY
@given(seeds, st.integers(1, 2), st.lists(st.floats(0.5, 4.0), min_size=3, max_size=3, unique=True))
def test_compress_equals_truncated_svd(seed, k, gaps):
    # Distinct, well separated singular values: s_1 > s_2 > s_3 (> s_4), so the best rank-k ΔW is unique.
    base = sorted(gaps, reverse=True)
    sv = {}
    for name, (d_out, d_in) in SHAPES.items():
        r = min(3, d_out, d_in)
        sv[name] = [sum(base[i:]) * 2.0 + 1.0 for i in range(r)]  # strictly decreasing, gaps >= 0.5
    adapter = _adapter_with_singular_values(seed, sv)
    small = adapter.compress(k)
    for name, f in small.items():
        w = adapter.delta_weight(name)
        u, s, vh = torch.linalg.svd(w)
        best = (u[:, :k] * s[:k]) @ vh[:k]
        torch.testing.assert_close(f.scale * (f.B @ f.A), best, rtol=1e-8, atol=1e-8)
        assert f.rank == k
        # Eckart–Young: the error is the norm of the dropped singular values.
        err = torch.linalg.matrix_norm(w - f.scale * f.B @ f.A)
        assert math.isclose(err.item(), s[k:].norm().item(), rel_tol=1e-8, abs_tol=1e-8)


@PROPERTY
@given(seeds, seeds, ranks, ranks, scales, scales)
def test_dot_norm_cosine_equal_the_dense_computation(sa, sb, ra, rb, ca, cb):
    a, b = make(sa, ra, ca), make(sb, rb, cb)
    da, db = dense(a), dense(b)
    dot = frobenius_dot(da, db)
    torch.testing.assert_close(a.dot(b), dot, **TOL)
    torch.testing.assert_close(b.dot(a), dot, **TOL)
    norm_a = frobenius_dot(da, da).sqrt()
    torch.testing.assert_close(a.norm(), norm_a, **TOL)
    flat_a = torch.cat([da[n].flatten() for n in SHAPES])
    flat_b = torch.cat([db[n].flatten() for n in SHAPES])
    torch.testing.assert_close(
        a.cosine(b), torch.nn.functional.cosine_similarity(flat_a, flat_b, dim=0), **TOL
    )
    torch.testing.assert_close(a.cosine(a), torch.tensor(1.0, dtype=torch.float64), **TOL)
    torch.testing.assert_close((-a).cosine(a), torch.tensor(-1.0, dtype=torch.float64), **TOL)
    assert a.norm().dim() == 0


@PROPERTY
@given(st.lists(st.tuples(seeds, ranks, scales), min_size=1, max_size=4))
def test_stack_unbind_round_trip_with_differing_ranks_and_scales(specs):
    singles = [make(*spec) for spec in specs]
    batched = stack(singles)
    assert batched.batch_size == len(singles)
    assert batched.rank == max(r for _, r, _ in specs)
    for name in SHAPES:
        want = torch.stack([dense(a)[name] for a in singles])
        torch.testing.assert_close(batched.delta_weight(name), want, **TOL)  # [N, d_out, d_in]
    back = batched.unbind()
    assert len(back) == len(singles)
    for got, single in zip(back, singles, strict=True):
        assert got.batch_size is None
        assert_dense_equal(got, dense(single))


@PROPERTY
@given(seeds, st.integers(1, 3), ranks, ranks, scales, scales, st.floats(-2.0, 2.0, allow_nan=False))
def test_batched_algebra_is_per_example(seed, n, rx, ry, cx, cy, c):
    X, Y = make(seed, rx, cx, batch=n), make(seed + 100, ry, cy, batch=n)
    single = make(seed + 200, 2, 0.7)
    xs, ys = X.unbind(), Y.unbind()

    def per_example(build) -> dict[str, torch.Tensor]:
        return {name: torch.stack([build(i)[name] for i in range(n)]) for name in SHAPES}

    assert_dense_equal(X + Y, per_example(lambda i: {k: dense(xs[i])[k] + dense(ys[i])[k] for k in SHAPES}))
    assert_dense_equal(X - Y, per_example(lambda i: {k: dense(xs[i])[k] - dense(ys[i])[k] for k in SHAPES}))
    assert_dense_equal(c * X, per_example(lambda i: {k: c * dense(xs[i])[k] for k in SHAPES}))
    # A single adapter broadcasts over the batch, from either side.
    assert_dense_equal(
        X + single, per_example(lambda i: {k: dense(xs[i])[k] + dense(single)[k] for k in SHAPES})
    )
    assert_dense_equal(
        single + X, per_example(lambda i: {k: dense(single)[k] + dense(xs[i])[k] for k in SHAPES})
    )
    assert (X + Y).batch_size == n and (X + single).batch_size == n
    # Inner products and norms are per example: [N].
    dots = X.dot(Y)
    assert dots.shape == (n,)
    torch.testing.assert_close(dots, torch.stack([x.dot(y) for x, y in zip(xs, ys, strict=True)]), **TOL)
    torch.testing.assert_close(X.norm(), torch.stack([x.norm() for x in xs]), **TOL)
    torch.testing.assert_close(
        X.cosine(Y), torch.stack([x.cosine(y) for x, y in zip(xs, ys, strict=True)]), **TOL
    )
    # compress works example by example.
    small = (X + Y).compress(1)
    assert small.batch_size == n
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        want = (x + y).compress(1)
        for name in SHAPES:
            torch.testing.assert_close(
                small.delta_weight(name)[i], want.delta_weight(name), rtol=1e-8, atol=1e-8
            )


# ------------------------------------------------------------------------------------------ plain checks
def test_mapping_and_properties():
    factors = {
        "a.q": LoraFactors(torch.randn(2, 5), torch.randn(6, 2), 0.5),
        "a.k": LoraFactors(torch.randn(3, 5), torch.randn(4, 3), 2.0),
    }
    adapter = ContextAdapter(factors, base_model="org/base", base_revision="abc123", metadata={"chunks": 3})
    assert list(adapter) == ["a.q", "a.k"] and len(adapter) == 2 and "a.q" in adapter
    assert adapter["a.k"] is factors["a.k"]
    assert adapter.rank == 3 and adapter.ranks == {"a.q": 2, "a.k": 3}
    assert adapter.shapes == {"a.q": (6, 5), "a.k": (4, 5)}
    assert adapter.batch_size is None
    assert adapter.dtype == torch.float32 and adapter.device == torch.device("cpu")
    assert adapter.base_model == "org/base" and adapter.base_revision == "abc123"
    assert adapter.metadata == {"chunks": 3}
    assert adapter.num_parameters() == 2 * 5 + 6 * 2 + 3 * 5 + 4 * 3
    torch.testing.assert_close(adapter.delta_weight("a.q"), 0.5 * factors["a.q"].B @ factors["a.q"].A)
    with pytest.raises(KeyError, match="not a target module"):
        adapter["a.v"]
    with pytest.raises(TypeError):
        adapter["a.q"] = factors["a.k"]  # read-only mapping
    assert "rank=3" in repr(adapter) and "org/base" in repr(adapter)


def test_algebra_keeps_the_base_model():
    a = ContextAdapter.random(SHAPES, seed=0, base_model="org/base")
    b = ContextAdapter.random(SHAPES, seed=1)  # unknown base: fits anything
    assert (a + b).base_model == "org/base" and (b + a).base_model == "org/base"
    assert (2 * a).base_model == "org/base"
    assert a.compress(1).base_model == "org/base"
    assert stack([b, a]).base_model == "org/base"


def test_random_is_seeded_and_zeros_like_is_the_identity():
    a = ContextAdapter.random(SHAPES, rank=3, seed=7)
    again = ContextAdapter.random(SHAPES, rank=3, seed=7)
    other = ContextAdapter.random(SHAPES, rank=3, seed=8)
    for name in SHAPES:
        assert torch.equal(a[name].A, again[name].A) and torch.equal(a[name].B, again[name].B)
        assert not torch.equal(a[name].A, other[name].A)
    zero = ContextAdapter.zeros_like(a)
    assert_dense_equal(a + zero, dense(a), rtol=0, atol=0)
    assert float(zero.norm()) == 0.0


def test_to_changes_dtype_and_device_and_keeps_the_update():
    a = make(0, 2, 1.5)
    half = a.to(dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    assert_dense_equal(half.to(dtype=torch.float64), dense(a), rtol=2e-2, atol=2e-2)
    meta = a.to("meta")
    assert meta.device.type == "meta" and meta.dtype == torch.float64
    with pytest.raises(ValueError, match="floating point"):
        a.to(dtype=torch.int8)


def test_algebra_in_bfloat16_stays_in_bfloat16():
    a = make(0, 2, 1.0).to(dtype=torch.bfloat16)
    b = make(1, 3, -0.5).to(dtype=torch.bfloat16)
    for result in (a + b, a - b, 2.0 * a, (a + b).compress(2), stack([a, b])):
        assert result.dtype == torch.bfloat16
    want = {n: dense(a.to(dtype=torch.float64))[n] + dense(b.to(dtype=torch.float64))[n] for n in SHAPES}
    assert_dense_equal((a + b).to(dtype=torch.float64), want, rtol=2e-2, atol=5e-2)
    # Inner products are accumulated in float32 whatever the factors' dtype.
    assert a.dot(b).dtype == torch.float32


def test_norm_and_dot_are_differentiable_in_the_factors():
    a = make(0, 2, 1.0)
    A = a["model.layers.0.self_attn.q_proj"].A.clone().requires_grad_()
    factors = dict(a.items())
    factors["model.layers.0.self_attn.q_proj"] = LoraFactors(
        A, factors["model.layers.0.self_attn.q_proj"].B, 1.0
    )
    trainable = ContextAdapter(factors)
    (trainable + make(1, 2, 1.0)).norm().backward()
    assert A.grad is not None and A.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------ error paths
def _factors(shapes=SHAPES, rank=2, dtype=torch.float32, batch=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lead = () if batch is None else (batch,)
    return {
        n: LoraFactors(
            torch.randn(*lead, rank, d_in, generator=gen).to(dtype),
            torch.randn(*lead, d_out, rank, generator=gen).to(dtype),
        )
        for n, (d_out, d_in) in shapes.items()
    }


@pytest.mark.parametrize("op", ["add", "sub", "dot", "cosine", "stack"])
def test_mismatched_base_model(op):
    a = ContextAdapter(_factors(), base_model="org/one")
    b = ContextAdapter(_factors(seed=1), base_model="org/two")
    with pytest.raises(AdapterMismatchError, match="different base models.*org/one.*org/two"):
        _binary(op, a, b)


def _binary(op: str, a: ContextAdapter, b: ContextAdapter):
    if op == "add":
        return a + b
    if op == "sub":
        return a - b
    if op == "dot":
        return a.dot(b)
    if op == "cosine":
        return a.cosine(b)
    if op == "stack":
        return stack([a, b])
    if op == "compose":
        return compose([a, b], [1.0, 2.0])
    raise AssertionError(op)


@pytest.mark.parametrize("op", ["add", "dot", "compose"])
def test_mismatched_revision(op):
    a = ContextAdapter(_factors(), base_model="org/one", base_revision="v1")
    b = ContextAdapter(_factors(seed=1), base_model="org/one", base_revision="v2")
    with pytest.raises(AdapterMismatchError, match="different revisions.*v1.*v2"):
        _binary(op, a, b)


@pytest.mark.parametrize("op", ["add", "sub", "dot", "stack"])
def test_mismatched_modules(op):
    a = ContextAdapter(_factors())
    fewer = dict(list(SHAPES.items())[:2])
    b = ContextAdapter(_factors(fewer))
    with pytest.raises(AdapterMismatchError, match="different target modules.*down_proj"):
        _binary(op, a, b)
    renamed = {("x." + n): s for n, s in SHAPES.items()}
    with pytest.raises(AdapterMismatchError, match="different target modules"):
        _binary(op, a, ContextAdapter(_factors(renamed)))


@pytest.mark.parametrize("op", ["add", "dot", "stack"])
def test_mismatched_shapes(op):
    a = ContextAdapter(_factors())
    other = dict(SHAPES)
    other["model.layers.0.self_attn.k_proj"] = (4, 5)
    with pytest.raises(AdapterMismatchError, match=r"k_proj.*\(3, 5\).*\(4, 5\)"):
        _binary(op, a, ContextAdapter(_factors(other)))


@pytest.mark.parametrize("op", ["add", "dot", "stack"])
def test_mismatched_dtype(op):
    a = ContextAdapter(_factors())
    b = ContextAdapter(_factors(dtype=torch.bfloat16))
    with pytest.raises(AdapterMismatchError, match="dtype.*convert one first"):
        _binary(op, a, b)


@pytest.mark.parametrize("op", ["add", "dot", "stack"])
def test_mismatched_device(op):
    a = ContextAdapter(_factors())
    b = a.to("meta")  # a second device without needing one
    with pytest.raises(AdapterMismatchError, match="on cpu and meta.*move one first"):
        _binary(op, a, b)


@pytest.mark.parametrize("op", ["add", "sub", "dot"])
def test_mismatched_batch_sizes(op):
    a = ContextAdapter(_factors(batch=2))
    b = ContextAdapter(_factors(batch=3, seed=1))
    with pytest.raises(AdapterMismatchError, match="batch sizes 2 and 3"):
        _binary(op, a, b)


def test_stack_refuses_batched_and_empty_input_and_unbind_needs_a_batch():
    a = ContextAdapter(_factors())
    with pytest.raises(ValueError, match="single adapters"):
        stack([ContextAdapter(_factors(batch=2)), ContextAdapter(_factors(batch=2, seed=1))])
    with pytest.raises(ValueError, match="at least one"):
        stack([])
    with pytest.raises(ValueError, match="needs a batched adapter"):
        a.unbind()


def test_empty_adapter():
    with pytest.raises(ValueError, match="at least one target module"):
        ContextAdapter({})


def test_compose_bad_arguments():
    a = ContextAdapter(_factors())
    with pytest.raises(ValueError, match="at least one adapter"):
        compose([])
    with pytest.raises(ValueError, match="2 adapters but 1 weights"):
        compose([a, a], [1.0])


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), "2", None, torch.ones(2)])
def test_compose_bad_weight(weight):
    a = ContextAdapter(_factors())
    with pytest.raises(ValueError, match="weights must be finite numbers; weight 1 is"):
        compose([a, a], [1.0, weight])


def test_compose_checks_every_adapter_not_only_against_the_first():
    """The first adapter names no base and no batch; two later ones disagree with each other."""
    bare = ContextAdapter(_factors())
    one = ContextAdapter(_factors(seed=1), base_model="org/one")
    two = ContextAdapter(_factors(seed=2), base_model="org/two")
    with pytest.raises(AdapterMismatchError, match="different base models.*org/one.*org/two"):
        compose([bare, one, two])
    three, four = make(0, batch=3), make(1, batch=4)
    single = make(2)
    with pytest.raises(AdapterMismatchError, match="different batch sizes.*3, 4"):
        compose([single, three, four])
    with pytest.raises(TypeError, match="expected ContextAdapter"):
        compose([1.0, bare])


@pytest.mark.parametrize("rank", [0, -1, 2.5, "2", None])
def test_compress_bad_rank(rank):
    a = ContextAdapter(_factors())
    with pytest.raises(ValueError, match="positive integer rank"):
        a.compress(rank)


@pytest.mark.parametrize(
    "other",
    [torch.tensor([1.0, 2.0]), torch.ones(2, 2), "2", [2.0], None],
    ids=["vector", "matrix", "str", "list", "none"],
)
def test_multiply_by_a_non_scalar(other):
    a = ContextAdapter(_factors())
    with pytest.raises(TypeError):
        a * other
    with pytest.raises(TypeError):
        other * a


def test_multiply_two_adapters_and_add_a_number():
    a = ContextAdapter(_factors())
    with pytest.raises(TypeError):
        a * a
    with pytest.raises(TypeError):
        a + 1.0
    with pytest.raises(TypeError):
        1 + a  # only 0 + a is allowed, so that sum([...]) works


@pytest.mark.parametrize("c", [math.inf, -math.inf, math.nan])
def test_scaling_by_a_non_finite_number(c):
    a = ContextAdapter(_factors())
    with pytest.raises(ValueError, match="Cannot scale"):
        a * c
    with pytest.raises(ZeroDivisionError):
        a / 0


def test_dot_with_something_else():
    a = ContextAdapter(_factors())
    with pytest.raises(TypeError, match="Cannot take the inner product"):
        a.dot(torch.ones(3))


@pytest.mark.parametrize(
    "factors, match",
    [
        ({"m": LoraFactors(torch.randn(5), torch.randn(6, 1))}, "must both be 2-D"),
        ({"m": LoraFactors(torch.randn(2, 5), torch.randn(2, 6, 2))}, "must both be 2-D"),
        ({"m": LoraFactors(torch.randn(2, 5), torch.randn(6, 3))}, "disagree on the rank"),
        ({"m": LoraFactors(torch.randn(2, 2, 5), torch.randn(3, 6, 2))}, "disagree on the rank"),
        ({"m": LoraFactors(torch.randn(2, 5), torch.randn(6, 2).double())}, "differ in dtype or device"),
        (
            {"m": LoraFactors(torch.ones(2, 5, dtype=torch.long), torch.ones(6, 2, dtype=torch.long))},
            "floating point",
        ),
        ({"m": LoraFactors(torch.randn(2, 5), torch.randn(6, 2), math.inf)}, "finite"),
        (
            {
                "m": LoraFactors(torch.randn(2, 5), torch.randn(6, 2)),
                "n": LoraFactors(torch.randn(2, 2, 5), torch.randn(2, 6, 2)),
            },
            "batch sizes",
        ),
        (
            {
                "m": LoraFactors(torch.randn(2, 5), torch.randn(6, 2)),
                "n": LoraFactors(torch.randn(2, 5).double(), torch.randn(6, 2).double()),
            },
            "differ in dtype or device",
        ),
    ],
)
def test_constructor_rejects_malformed_factors(factors, match):
    with pytest.raises(ValueError, match=match):
        ContextAdapter(factors)


def test_constructor_rejects_other_values():
    with pytest.raises(TypeError, match="expected LoraFactors"):
        ContextAdapter({"m": (torch.randn(2, 5), torch.randn(6, 2))})


def test_target_modules_that_match_no_layer_are_named():
    """A typo in target_modules: the error names it and lists the layer names that exist."""
    from ctx2param.testing_utils import tiny_model

    with pytest.raises(ValueError, match=r"No linear layer of LlamaForCausalLM matches .*'qproj'") as info:
        ContextAdapter.random(tiny_model("llama"), rank=2, target_modules=["qproj"])
    assert "'q_proj'" in str(info.value) and "'down_proj'" in str(info.value)
