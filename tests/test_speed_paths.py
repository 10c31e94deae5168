"""The faster read/write paths give bit-identical results to the plain ones they replace."""

from __future__ import annotations

import pytest
import torch

from streamkv.kv.storage.codebook import quantize_codebook
from streamkv.kv.storage.packed import quantize
from streamkv.kv.storage.packing import WIDTHS, _pack_shifts, _unpack_shifts, pack, unpack
from streamkv.kv.storage.raw import Raw
from streamkv.kv.transforms.rope import RopeTable


@pytest.mark.parametrize("bits", WIDTHS)
def test_pack_and_unpack_match_the_per_code_shift_versions(bits):
    g = torch.Generator().manual_seed(bits)
    for shape in [(), (3,), (2, 5)]:
        for n in [1, 2, 3, 7, 8, 9, 15, 16, 17, 63, 64, 65, 8192 - 3]:
            codes = torch.randint(0, 2**bits, (*shape, n), generator=g, dtype=torch.uint8)
            packed = pack(codes, bits)
            assert packed.is_contiguous() and torch.equal(packed, _pack_shifts(codes, bits))
            assert torch.equal(unpack(packed, bits, n), _unpack_shifts(packed, bits, n))
    codes = torch.randint(0, 2**bits, (6, 4, 100), generator=g, dtype=torch.uint8)
    for view in (codes[::2], codes[:, 1:3], codes[..., 1:], codes.transpose(0, 1), codes.long()):
        assert torch.equal(pack(view, bits), _pack_shifts(view, bits))
    packed = pack(codes, bits)
    assert torch.equal(unpack(packed[::2], bits, 100), codes[::2])


@pytest.mark.parametrize("axis,group", [("channel", 16), ("token", 8)])
def test_dequantize_into_a_slice_equals_dequantize(axis, group):
    x = torch.randn(3, 64, 16, generator=torch.Generator().manual_seed(0))
    buf = torch.full((3, 70, 16), float("nan"))
    for q in (quantize(x, 3, axis, group), quantize_codebook(x, 3, axis, group, "nf"), Raw(x.half())):
        q.dequantize(torch.float32, out=buf[:, :64])
        assert torch.equal(buf[:, :64], q.dequantize(torch.float32))
        assert buf[:, 64:].isnan().all()


def test_in_place_rotation_is_bit_identical():
    class Rotary(torch.nn.Module):
        def forward(self, x, pos):
            inv = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
            f = pos[..., None].float() * inv
            emb = torch.cat([f, f], -1)
            return emb.cos(), emb.sin()

    table = RopeTable(Rotary())
    x = torch.randn(3, 40, 16, generator=torch.Generator().manual_seed(1))
    for start in (0, 7):
        expected = table.rotate(x, start)
        y = x.clone()
        assert table.rotate_(y, start) is y and torch.equal(y, expected)
