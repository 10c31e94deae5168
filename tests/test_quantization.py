import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streamkv.kv.storage.packed import encode, quantize
from streamkv.kv.storage.raw import Raw


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    axis=st.sampled_from(["channel", "token"]),
    units=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_error_is_at_most_half_a_step(bits, axis, units, seed):
    g = torch.Generator().manual_seed(seed)
    group, dim = 8, 16
    tokens = units * group if axis == "channel" else units
    x = torch.randn(3, tokens, dim, generator=g) * 3 + 1
    q = quantize(x, bits, axis, group)
    a, b = (group, dim) if axis == "channel" else (dim // group, group)
    step = q.scale.float().expand(3, q.codes.shape[1], a, b).reshape(x.shape)
    err = (q.dequantize(torch.float32) - x).abs()
    # half a step, plus the fp16 rounding of the zero point (relative 2**-11)
    assert (err <= step / 2 * 1.001 + x.abs().max() * 2**-10).all()


def test_packed_sizes_are_real():
    x = torch.randn(2, 128, 64)
    q = quantize(x, 4, "channel", 128)
    assert q.codes.nbytes == 2 * 128 * 64 // 2  # 4 bits per value
    assert q.scale.dtype == q.zero.dtype == torch.float16
    assert q.nbytes * 8 / x.numel() == pytest.approx(4 + 32 / 128)


def test_excluded_values_do_not_widen_the_group():
    x = torch.randn(1, 8, 16)
    x_out = x.clone()
    x_out[0, 3, 5] = 100.0
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[0, 3, 5] = True
    q = quantize(x_out, 4, "token", 16, exclude=mask)
    err = (q.dequantize(torch.float32) - x).abs()
    err[0, 3, 5] = 0
    assert err.max() < 0.5  # a 100.0 outlier in the range would give steps of ~6.7


def test_append_extends_along_tokens():
    a, b = torch.randn(2, 16, 8), torch.randn(2, 32, 8)
    qa, qb = quantize(a, 8, "channel", 16), quantize(b, 8, "channel", 16)
    both = qa.append(qb)
    assert both.tokens == 48
    torch.testing.assert_close(both.dequantize(torch.float32), torch.cat([a, b], 1), atol=0.05, rtol=0)


def test_sixteen_bits_is_fp16_raw():
    x = torch.randn(2, 3, 8)
    e = encode(x, 16, "token", 8)
    assert isinstance(e, Raw) and e.data.dtype == torch.float16 and e.nbytes == x.numel() * 2


def test_hadamard_rotation_is_orthonormal_and_read_back():
    from streamkv.kv.transforms.hadamard import hadamard

    h = hadamard(64)
    torch.testing.assert_close(h @ h.T, torch.eye(64), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(48)


def test_rotation_spreads_a_large_channel_and_lowers_the_error():
    from streamkv.kv.quantizers.uniform import UniformQuantizer

    torch.manual_seed(0)
    x = torch.randn(3, 128, 64)
    x[:, :, 5] *= 20  # one loud channel sets every per-token group's range
    plain, rotated = (UniformQuantizer(value_bits=3, rotate_values=r).encode_values(x) for r in (False, True))
    assert rotated.nbytes == plain.nbytes  # the rotation is free in storage
    err = [(e.dequantize(torch.float32) - x).pow(2).mean().sqrt() for e in (plain, rotated)]
    assert err[1] < 0.5 * err[0]


def test_rotated_values_keep_excluded_positions_out_of_the_groups():
    from streamkv.kv.quantizers.uniform import UniformQuantizer

    x = torch.randn(1, 4, 64)
    x[0, 2, 7] = 500.0
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[0, 2, 7] = True
    y = UniformQuantizer(value_bits=4, rotate_values=True).encode_values(x, mask).dequantize(torch.float32)
    y[mask] = x[mask]  # the cache overwrites excluded positions from their own storage
    assert (y - x).abs().max() < 0.5
