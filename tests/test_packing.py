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
