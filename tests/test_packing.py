import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streamkv.kv.storage.packing import WIDTHS, pack, packed_size, unpack


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from(WIDTHS),
    shape=st.lists(st.integers(1, 5), min_size=0, max_size=2),
    n=st.integers(1, 70),
    seed=st.integers(0, 2**16),
)
def test_pack_unpack_round_trip(bits, shape, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (*shape, n), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*shape, packed_size(n, bits))
    assert torch.equal(unpack(packed, bits, n), codes)


@pytest.mark.parametrize("bits,expected", [(2, 16), (3, 24), (4, 32), (8, 64)])
def test_packed_bytes_are_bits_over_eight(bits, expected):
    assert pack(torch.zeros(64, dtype=torch.uint8), bits).numel() == expected


def test_unsupported_width_is_refused():
    with pytest.raises(ValueError, match="bits=5"):
        pack(torch.zeros(8, dtype=torch.uint8), 5)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("kind", ["minmax_token", "minmax_channel", "lloyd_max_token", "lloyd_max_channel_zero"])
def test_compiled_dequantize_reads_what_the_torch_path_reads(bits, kind, monkeypatch):
    """storage/dequant_kernel.py against Quantized.dequantize's torch path: every width, both group axes,
    codebook and integer codes, into a fresh tensor, into a slice of a larger buffer, and a row-split
    block straight into its rows."""
    pytest.importorskip("numba")
    from streamkv.kv.storage import dequant_kernel
    from streamkv.kv.storage.codebook import quantize_lloyd_max
    from streamkv.kv.storage.composite import split_rows
    from streamkv.kv.storage.packed import quantize

    x = torch.randn(4, 96, 64, generator=torch.Generator().manual_seed(bits)) * 3

    def encode(rows, b):
        part = x if rows is None else x[rows]
        if kind.startswith("minmax"):
            return quantize(part, b, kind.split("_")[1], 32)
        axis = "token" if kind.endswith("token") else "channel"
        return quantize_lloyd_max(part, b, axis, 32, zero=kind.endswith("zero"), rotated=False)

    for block in (encode(None, bits), split_rows([bits, 2, bits, 4], encode, 64)):
        got = block.dequantize(torch.float32)
        into = torch.full((4, 130, 64), 7.0)
        block.dequantize(torch.float32, out=into[:, 20:116])
        with monkeypatch.context() as m:
            m.setattr(dequant_kernel, "available", lambda: False)
            reference = block.dequantize(torch.float32)
        assert torch.equal(got, reference)
        assert torch.equal(into[:, 20:116], reference)
        assert (into[:, :20] == 7).all() and (into[:, 116:] == 7).all()
