"""The Triton backend: fused decode and chunked-prefill kernels on the packed codes (CUDA GPU).

The packed body of a layer is read by :mod:`streamkv.kv.kernels.triton_attention` straight from its
codes, split over the history (flash-decoding) when few queries attend and over query blocks in
chunked prefill; the small full-precision pieces (sinks, residual, the forward's own tokens) are
attended by one more program per row; a merge kernel combines the partial softmaxes, un-rotates the
values once and writes the output. Every layout of the engine's quantizers is served in the kernel:
packed widths 1/2/3/4/8, per-channel and per-token groups, codebook LUTs, Hadamard-rotated keys and
values, keys stored before RoPE (rotated back and RoPE'd in the kernel), sinks and sparse outliers.

No host synchronisation happens in a forward: sizes come from shapes, outlier lists are built with
sorts and searches on the device (once per stored outlier set, held by it). A segment the kernels do
not read (a storage class they do not know) sends the whole forward to the ``fallback`` backend.
Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (slowly: for tests).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from ..errors import ConfigError
from ..storage.packing import RAW_BITS, WIDTHS
from ..transforms.hadamard import hadamard, hadamard_on
from ..transforms.rope import rotate_half
from .fused import FusedBackend
from .triton_plan import block_args, outlier_lists, plan
from .view import DECODE_QUERIES, LayerView

DECODE_WARPS, PREFILL_WARPS = 4, 8  # warps per program (tools/triton_compile_check.py reports registers and spills)
ROW_LOADS = True  # read each token's packed bytes as one row and spread them in registers (False: byte per code)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@lru_cache(maxsize=None)
def _triton_error() -> str:
    try:
        import triton  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return ""


@dataclass
class TritonBackend:
    """Fused Triton kernels on the packed codes; see the module docstring.

    ``block_n``: history tokens per tile. ``block_m``: queries per program in chunked prefill.
    ``decode_queries``: up to this many queries per KV row (query heads per KV head x chunk length)
    a forward counts as decoding: one query block, the history split over the GPU. ``splits``:
    history splits per (row, query block); 0 = enough programs to fill the GPU.
    """

    block_n: int = 64
    block_m: int = 128
    decode_queries: int = DECODE_QUERIES
    splits: int = 0
    fallback: FusedBackend = field(default_factory=FusedBackend)

    name = "triton"
    materializes = False

    @staticmethod
    def importable() -> bool:
        """Whether the kernels can run here: triton imports, and a CUDA GPU (or the interpreter)."""
        return not _triton_error() and (torch.cuda.is_available() or _interpreting())

    def check(self, compression, device: torch.device) -> None:
        """Refuse, in one line, a device or storage the kernels cannot serve."""
        why = _triton_error()
        if why:
            raise ConfigError(f"attention=triton needs the triton package ({why}); use attention=fused (or auto)")
        if torch.device(device).type != "cuda" and not _interpreting():
            raise ConfigError(
                f"attention=triton runs on a CUDA GPU (or under TRITON_INTERPRET=1), not on {torch.device(device).type}; "
                "use attention=fused (or auto)"
            )
        q = compression.quantizer
        for kind in ("key", "value"):
            bits = getattr(q, f"{kind}_bits", None)  # a quantizer without fixed widths is checked when read
            if isinstance(bits, int) and bits not in (*WIDTHS, RAW_BITS):
                raise ConfigError(f"attention=triton reads packed widths {list(WIDTHS)}, not quantizer.{kind}_bits={bits}; use attention=fused")

    # -- one forward ------------------------------------------------------------------------------
    def attend(self, view: LayerView, query: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """``query`` (batch, q_heads, q_len, dim) → output (batch, q_len, q_heads, dim)."""
        planned = plan(view, query)
        if planned is None:
            return self.fallback.attend(view, query, mask, scaling)
        from ..kernels import triton_attention as K

        body, pieces = planned
        gq = view.grouping(query)
        b, hq, ql, d, heads, group, rows, nq = gq.batch, gq.q_heads, gq.q_len, gq.dim, gq.heads, gq.group, gq.rows, gq.nq
        dev, dt = query.device, query.dtype
        q = gq.rows_of(query)
        if q.stride(-1) != 1:
            q = q.contiguous()
        dp = max(16, triton_next_pow2(d))
        bn = self.block_n
        decode = view.is_decoding(query, self.decode_queries)
        # float32 operands take twice the shared memory: 128-query blocks would not fit in a Hopper SM's 227 KiB
        bm = max(16, triton_next_pow2(nq)) if decode else (self.block_m if dt != torch.float32 else min(self.block_m, 64))
        q_blocks = -(-nq // bm)
        prec = "ieee" if dt == torch.float32 else "tf32"
        dummy = _dummy(dev)

        # the packed body and its transforms
        T = body.tokens if body is not None else 0
        n_tiles = -(-T // bn)
        first = (body.skip // bn) if body is not None else 0
        splits = 0
        if n_tiles > first:
            splits = self.splits or max(1, -(-_target_programs(dev) // (rows * q_blocks)))
            splits = min(splits, n_tiles - first)
        per_split = -(-(n_tiles - first) // splits) if splits else 0
        splits = -(-(n_tiles - first) // per_split) if splits else 0
        vrot = body is not None and body.value_hadamard
        kargs = block_args(body.keys, dummy) if body is not None else block_args(None, dummy)
        vargs = block_args(body.values, dummy) if body is not None else block_args(None, dummy)
        rope = body is not None and body.key_rope is not None
        khad = body is not None and body.key_hadamard
        h = hadamard_on(d, dev, dt) if (khad or vrot) and _pow2(d) else dummy
        cos = sin = rm1 = rm2 = dummy
        s_cos, width = 0, d
        if rope:  # the model's cos/sin of the rotated (leading ``width``) channels, by position
            cos, sin = body.key_rope._table(body.start + T, q)
            s_cos, width = cos.stride(0), cos.shape[-1]
            if khad:
                rm1, rm2 = _rope_hadamard(d, width, dt, dev)
        ko = outlier_lists(body, "keys", rows, bn, cos, sin, width) if body is not None else None
        vo = outlier_lists(body, "values", rows, bn, cos, sin, width) if body is not None else None
        vsep = vrot and vo is not None
        ko_args = ko if ko is not None else (dummy,) * 5
        vo_args = vo[:4] if vo is not None else (dummy,) * 4

        # the mask transformers built (True = attend), read by column
        if mask is not None:
            m = mask.expand(b, 1, ql, mask.shape[-1])
            m_args = (m.view(torch.uint8) if m.dtype == torch.bool else m != 0, m.stride(0), m.stride(2), m.stride(3))
        else:
            m_args = (dummy, 0, 0, 0)
        off = view.mask_offset
        piece_args = []
        for k, v, pos in pieces:
            piece_args += [k, v, k.stride(0), k.stride(1), v.stride(0), v.stride(1), k.shape[1], pos - off]

        n_slots = splits + 1 + (splits if vsep else 0)
        mo = torch.empty(rows, n_slots, nq, dtype=torch.float32, device=dev)
        lo = torch.empty_like(mo)
        ao = torch.empty(rows, n_slots, nq, d, dtype=torch.float32, device=dev)
        grid = (q_blocks, rows, splits + 1)
        K.attend_kernel[grid](
            q, q.stride(0), q.stride(1), h,
            *kargs, *vargs,
            cos, sin, s_cos, rm1, rm2,
            *ko_args, *vo_args,
            *m_args,
            *piece_args,
            mo, lo, ao,
            float(scaling), nq, ql, heads, T, body.skip if body is not None else 0,
            (body.start - off) if body is not None else 0, body.start if body is not None else 0,
            n_tiles, first, per_split, splits, n_slots,
            D=d, DP=dp, BM=bm, BN=bn, OB=16,
            KBITS=kargs.bits, KAXIS=kargs.axis, KG=kargs.group, KLUT=kargs.lut, KUT=kargs.axis == 0 and kargs.group % bn == 0,
            KROWS=ROW_LOADS and d == dp, VBITS=vargs.bits, VAXIS=vargs.axis, VG=vargs.group, VLUT=vargs.lut,
            VUT=vargs.axis == 0 and vargs.group % bn == 0, VROWS=ROW_LOADS and d == dp,
            QROT=khad and not rope, ROPE=rope, ROPE_H=rope and khad, RW=width,
            HAS_KO=ko is not None, HAS_VO=vo is not None, VSEP=vsep, HAS_MASK=mask is not None, PREC=prec,
            UP=_interpreting() and dt != torch.float32,
            num_warps=DECODE_WARPS if decode else PREFILL_WARPS,
        )
        out = torch.empty(b, ql, hq, d, dtype=dt, device=dev)
        bj = 16
        K.merge_kernel[(-(-nq // bj), rows)](
            mo, lo, ao, hadamard_on(d, dev, torch.float32) if vrot else dummy, out, out.stride(0), out.stride(1), out.stride(2), nq, ql, heads, group, n_slots,
            splits if vrot else 0, D=d, DP=dp, BJ=bj, HAS_ROT=vrot, num_warps=4,
        )
        return out


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@lru_cache(maxsize=None)
def _dummy(device: torch.device) -> torch.Tensor:
    return torch.zeros(16, dtype=torch.float32, device=device)


@lru_cache(maxsize=None)
def _rope_hadamard(d: int, width: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Hᵀ and Hᵀ with rotate_half on its leading ``width`` columns (zero past them): ``k_stored @ each``
    gives the pre-RoPE key and the rotate_half RoPE multiplies by sin."""
    ht = hadamard(d).T.contiguous()
    half = torch.zeros_like(ht)
    half[:, :width] = rotate_half(ht[:, :width])
    return ht.to(device, dtype), half.to(device, dtype)


@lru_cache(maxsize=None)
def _target_programs(device: torch.device) -> int:
    """Programs that fill the device: a few per streaming multiprocessor (1 under the interpreter)."""
    if device.type != "cuda" or _interpreting():
        return 1
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count
