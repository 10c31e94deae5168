"""Triton kernels for attention on the compressed history: decode (flash-decoding) and chunked prefill.

One kernel serves both regimes. A program owns one KV row (batch x kv-head), one block of queries
(all the query heads of its group times the chunk's positions) and one *split* of the packed body:
a run of ``BN``-token tiles that it dequantizes in registers, straight from the packed codes, and
attends on with an online softmax. Decoding has one query block and many splits (the history is
spread over the GPU); chunked prefill has many query blocks and few splits. One more program per
(row, query block) attends on the small full-precision pieces (sinks, residual, the forward's own
tokens). Each program leaves a partial ``(max, sum, unnormalised output)``; :func:`merge_kernel`
combines them, un-rotates the values' Hadamard domain once and writes ``(batch, q_len, q_heads, dim)``.

Everything a reader of :class:`~streamkv.kv.segments.KVSegment` must apply happens in the kernel:

* codes of 1/2/3/4/8 bits are a little-endian bit stream inside each storage unit (3-bit codes fill
  24-bit words the same way), so code ``i`` of a unit starts at bit ``i * bits``: a token's codes are one
  contiguous row of bytes, read with vector loads and spread into channels in registers (or, for RoPE's
  partner channels and head dims that are not a power of two, read code by code at their bytes);
* per-channel scales (``axis="channel"``: one per channel for every ``G`` tokens) or per-token ones
  (``axis="token"``: one per ``G`` channels of a token), and a codebook LUT when the block has one;
* Hadamard-rotated keys: the query is rotated once per program, ``(q H)·(k H) = q·k``;
* keys stored before RoPE: rotated back (``k Hᵀ``) when they were rotated, then RoPE'd at their positions
  from the model's own cos/sin table (its leading ``RW`` channels: partial rotary);
* sparse outliers, each the correction δ its position adds to the body's reading (un-rotated, pre-RoPE):
  a per-(row, tile) list (built by :mod:`streamkv.kv.attention.triton`) that adds ``q·δ`` to the scores
  (through RoPE when keys are pre-RoPE) and ``p δ`` to the output (in the plain domain: a separate
  accumulator when the values are rotated);
* sinks: the body's first ``skip`` tokens are masked (the sinks' own copy is a full-precision piece);
* the mask transformers built, by column; the forward's own tokens are causal among themselves.

No host synchronisation: every size the launch needs is a Python int known from shapes.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dequant(C, S, Z, LUT, scr, scu, ssr, ssu, r, t, tin, c, valid,
             D: tl.constexpr, BITS: tl.constexpr, AXIS: tl.constexpr, G: tl.constexpr, HAS_LUT: tl.constexpr,
             UNIT_TILE: tl.constexpr, ROWS: tl.constexpr, BN: tl.constexpr):
    """float32 (BN, DP): tokens ``t`` (valid: ``tin``) x channels ``c`` of row ``r``, from the packed codes.

    ``UNIT_TILE``: per-channel groups and the tile inside one unit (G a multiple of BN): one unit's scales
    serve the whole tile. ``ROWS``: ``c`` is ``arange(D)``, D a power of two: each token's packed bytes are
    read as one contiguous row (vector loads) and its codes spread in registers, in channel order;
    otherwise every code is read at its own byte (any channel order: RoPE's partner channels).
    """
    if UNIT_TILE:
        u = tl.min(t, 0) // G  # one unit for the tile
        within_t = t - u * G
        base_t = C + r * scr + u.to(tl.int64) * scu
    elif AXIS == 0:  # per channel: a unit is G tokens
        u = t // G
        within_t = t - u * G
        base_t = C + r * scr + u.to(tl.int64) * scu
    else:  # per token: a unit is one token
        u = t
        within_t = tl.zeros_like(t)
        base_t = C + r * scr + u.to(tl.int64) * scu
    if ROWS:
        if BITS == 3:  # eight codes per 24-bit word of three bytes
            NW: tl.constexpr = D // 8
            w = tl.arange(0, NW)
            row = base_t + within_t * (D * 3 // 8)
            ptr = row[:, None] + (w * 3)[None, :]
            m = tin[:, None]
            word = (tl.load(ptr, mask=m, other=0).to(tl.int32) | (tl.load(ptr + 1, mask=m, other=0).to(tl.int32) << 8)
                    | (tl.load(ptr + 2, mask=m, other=0).to(tl.int32) << 16))
            shift = tl.arange(0, 8) * 3
            code = tl.reshape((word[:, :, None] >> shift[None, None, :]) & 7, [BN, D])
        else:
            PER: tl.constexpr = 8 // BITS
            w = tl.arange(0, D // PER)
            row = base_t + within_t * (D // PER)
            byte = tl.load(row[:, None] + w[None, :], mask=tin[:, None], other=0).to(tl.int32)
            if BITS == 8:
                code = byte
            else:
                shift = tl.arange(0, PER) * BITS
                code = tl.reshape((byte[:, :, None] >> shift[None, None, :]) & ((1 << BITS) - 1), [BN, D])
    else:
        if UNIT_TILE:
            base = base_t
        else:
            base = base_t[:, None]
        within = within_t[:, None] * D + c[None, :]
        if BITS == 8:
            code = tl.load(base + within, mask=valid, other=0).to(tl.int32)
        elif BITS == 3:  # a code may straddle two bytes of its 24-bit word
            bit = within * 3
            sh = bit & 7
            b0 = tl.load(base + (bit >> 3), mask=valid, other=0).to(tl.int32)
            b1 = tl.load(base + (bit >> 3) + 1, mask=valid & (sh > 5), other=0).to(tl.int32)
            code = ((b0 | (b1 << 8)) >> sh) & 7
        else:
            bit = within * BITS
            b0 = tl.load(base + (bit >> 3), mask=valid, other=0).to(tl.int32)
            code = (b0 >> (bit & 7)) & ((1 << BITS) - 1)
    if HAS_LUT:
        level = tl.load(LUT + code, mask=valid, other=0.0).to(tl.float32)
    else:
        level = code.to(tl.float32)
    srow = S + r * ssr
    zrow = Z + r * ssr
    if UNIT_TILE:  # one scale per channel for the tile
        cm = (tl.max(valid.to(tl.int32), 0) != 0)[None, :]
        s = tl.load(srow + u * ssu + c[None, :], mask=cm, other=0.0).to(tl.float32)
        z = tl.load(zrow + u * ssu + c[None, :], mask=cm, other=0.0).to(tl.float32)
    elif AXIS == 1 and ROWS:  # D // G scales per token, spread over their G channels
        NG: tl.constexpr = D // G
        g = tl.arange(0, NG)
        sp = u[:, None] * ssu + g[None, :]
        s = tl.load(srow + sp, mask=tin[:, None], other=0.0).to(tl.float32)
        z = tl.load(zrow + sp, mask=tin[:, None], other=0.0).to(tl.float32)
        s = tl.reshape(tl.broadcast_to(s[:, :, None], [BN, NG, G]), [BN, D])
        z = tl.reshape(tl.broadcast_to(z[:, :, None], [BN, NG, G]), [BN, D])
    elif AXIS == 0:
        s = tl.load(srow + u[:, None] * ssu + c[None, :], mask=valid, other=0.0).to(tl.float32)
        z = tl.load(zrow + u[:, None] * ssu + c[None, :], mask=valid, other=0.0).to(tl.float32)
    else:
        s = tl.load(srow + u[:, None] * ssu + (c // G)[None, :], mask=valid, other=0.0).to(tl.float32)
        z = tl.load(zrow + u[:, None] * ssu + (c // G)[None, :], mask=valid, other=0.0).to(tl.float32)
    return level * s + z


@triton.jit
def _mm(a, b, PREC: tl.constexpr, UP: tl.constexpr):
    """``a @ b`` accumulated in float32; ``UP`` multiplies 16-bit operands in float32 (Triton's
    interpreter has no bfloat16 matmul)."""
    if UP:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _softmax_step(s, valid, m_i, l_i):
    """Online-softmax update: probabilities of ``s`` (masked by ``valid``) against the new running max."""
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _raw_piece(q, m_i, l_i, acc, PK, PV, skr, skt, svr, svt, n, col, r, iq, jm, bidx, offs_d, dm,
               MASK, sm_b, sm_q, sm_k,
               HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr, UP: tl.constexpr):
    """Attend on ``n`` full-precision tokens (rows, n, D) whose first mask column is ``col``."""
    DT = q.dtype
    hi = n
    if CAUSAL:  # the forward's own tokens: query i sees own tokens 0..i
        hi = tl.minimum(n, tl.max(tl.where(jm, iq, 0), 0) + 1)
    for t0 in range(0, hi, BN):
        t = t0 + tl.arange(0, BN)
        tin = t < n
        kv = tin[:, None] & dm[None, :]
        k = tl.load(PK + r * skr + t[:, None] * skt + offs_d[None, :], mask=kv, other=0.0).to(DT)
        s = _mm(q, tl.trans(k), PREC, UP)
        valid = jm[:, None] & tin[None, :]
        if CAUSAL:
            valid = valid & (t[None, :] <= iq[:, None])
        if HAS_MASK:
            mv = tl.load(MASK + bidx * sm_b + iq[:, None] * sm_q + (col + t)[None, :] * sm_k, mask=valid, other=0)
            valid = valid & (mv != 0)
        p, alpha, m_i, l_i = _softmax_step(s, valid, m_i, l_i)
        v = tl.load(PV + r * svr + t[:, None] * svt + offs_d[None, :], mask=kv, other=0.0).to(DT)
        acc = acc * alpha[:, None] + _mm(p.to(DT), v, PREC, UP)
    return m_i, l_i, acc


@triton.jit
def attend_kernel(
    Q, sq_r, sq_j, HQ,
    KC, KS, KZ, KL, skc_r, skc_u, sks_r, sks_u,
    VC, VS, VZ, VL, svc_r, svc_u, svs_r, svs_u,
    COS, SIN, s_cos, RM1, RM2,
    KOP, KOT, KOC, KOA, KOB,
    VOP, VOT, VOC, VOD,
    MASK, sm_b, sm_q, sm_k,
    A_K, A_V, sa_kr, sa_kt, sa_vr, sa_vt, a_n, a_col,
    B_K, B_V, sb_kr, sb_kt, sb_vr, sb_vt, b_n, b_col,
    C_K, C_V, sc_kr, sc_kt, sc_vr, sc_vt, c_n, c_col,
    MO, LO, AO,
    scale, nq, ql, heads, T, skip, body_col, body_pos, n_tiles, first_tile, tiles_per_split, n_splits, n_slots,
    D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, OB: tl.constexpr,
    KBITS: tl.constexpr, KAXIS: tl.constexpr, KG: tl.constexpr, KLUT: tl.constexpr, KUT: tl.constexpr, KROWS: tl.constexpr,
    VBITS: tl.constexpr, VAXIS: tl.constexpr, VG: tl.constexpr, VLUT: tl.constexpr, VUT: tl.constexpr, VROWS: tl.constexpr,
    QROT: tl.constexpr, ROPE: tl.constexpr, ROPE_H: tl.constexpr, RW: tl.constexpr,
    HAS_KO: tl.constexpr, HAS_VO: tl.constexpr, VSEP: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr, UP: tl.constexpr,
):
    """Grid (query blocks, rows, n_splits + 1); see the module docstring.

    Output slots per (row, query): ``0 .. n_splits-1`` the body's splits (in the values' stored domain),
    ``n_splits`` the full-precision pieces, ``n_splits + 1 + split`` the plain-domain value-outlier terms
    of a split when the values are rotated (``VSEP``; their sum ``l`` is 0).
    """
    pid_m = tl.program_id(0)
    r = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    offs_m = pid_m * BM + tl.arange(0, BM)
    jm = offs_m < nq
    iq = offs_m % ql  # query j = (head in group) * ql + position in the chunk
    bidx = r // heads
    offs_d = tl.arange(0, DP)
    dm = offs_d < D
    q = tl.load(Q + r * sq_r + offs_m[:, None] * sq_j + offs_d[None, :], mask=jm[:, None] & dm[None, :], other=0.0)
    DT = q.dtype
    q = (q.to(tl.float32) * scale).to(DT)
    m_i = tl.full([BM], -1.0e30, tl.float32)  # finite: a fully masked block gives weight 0, not NaN
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, DP], tl.float32)
    out = (r * n_slots) * nq + offs_m
    if split < n_splits:
        accx = tl.zeros([BM, DP], tl.float32)
        dd = dm[:, None] & dm[None, :]
        if QROT:
            h = tl.load(HQ + offs_d[:, None] * D + offs_d[None, :], mask=dd, other=0.0)
            qk = _mm(q, h, PREC, UP).to(DT)
        else:
            qk = q
        if ROPE_H:
            m1 = tl.load(RM1 + offs_d[:, None] * D + offs_d[None, :], mask=dd, other=0.0)
            m2 = tl.load(RM2 + offs_d[:, None] * D + offs_d[None, :], mask=dd, other=0.0)
        tlo = first_tile + split * tiles_per_split
        thi = tl.minimum(tlo + tiles_per_split, n_tiles)
        for tile in range(tlo, thi):
            t = tile * BN + tl.arange(0, BN)
            tin = t < T
            kv = tin[:, None] & dm[None, :]
            k = _dequant(KC, KS, KZ, KL, skc_r, skc_u, sks_r, sks_u, r, t, tin, offs_d, kv, D, KBITS, KAXIS, KG, KLUT, KUT, KROWS, BN)
            if ROPE:  # the leading RW channels rotate (partial rotary); past them cos = 1, sin = 0
                rc = (body_pos + t)[:, None] * s_cos + offs_d[None, :]
                rm = kv & (offs_d < RW)[None, :]
                cs = tl.load(COS + rc, mask=rm, other=1.0)
                sn = tl.load(SIN + rc, mask=rm, other=0.0)
                if ROPE_H:  # k Hᵀ and rotate_half(k Hᵀ) as two products
                    kd = k.to(DT)
                    k = _mm(kd, m1, PREC, UP) * cs + _mm(kd, m2, PREC, UP) * sn
                else:  # rotate_half reads the partner channel: -x[c + RW/2] below half, x[c - RW/2] above
                    lower = offs_d < RW // 2
                    partner = tl.where(lower, offs_d + RW // 2, tl.where(offs_d < RW, offs_d - RW // 2, offs_d))
                    kp = _dequant(KC, KS, KZ, KL, skc_r, skc_u, sks_r, sks_u, r, t, tin, partner, kv, D, KBITS, KAXIS, KG, KLUT,
                                  KUT, False, BN)
                    k = k * cs + tl.where(lower, -kp, kp) * sn
            s = _mm(qk, tl.trans(k.to(DT)), PREC, UP)
            if HAS_KO:  # s[:, t] += q[:, c] a + q[:, partner(c)] b for each key outlier (t, c) of this row and tile
                lo = tl.load(KOP + r * (n_tiles + 1) + tile)
                hi = tl.load(KOP + r * (n_tiles + 1) + tile + 1)
                for o0 in range(lo, hi, OB):
                    oo = o0 + tl.arange(0, OB)
                    om = oo < hi
                    ot = tl.load(KOT + oo, mask=om, other=-1).to(tl.int32)
                    oc = tl.load(KOC + oo, mask=om, other=0).to(tl.int32)
                    qm = jm[:, None] & om[None, :]
                    qo = tl.load(Q + r * sq_r + offs_m[:, None] * sq_j + oc[None, :], mask=qm, other=0.0).to(tl.float32)
                    w = qo * tl.load(KOA + oo, mask=om, other=0.0)[None, :]
                    if ROPE:
                        pc = tl.where(oc < RW // 2, oc + RW // 2, tl.where(oc < RW, oc - RW // 2, oc))
                        qp = tl.load(Q + r * sq_r + offs_m[:, None] * sq_j + pc[None, :], mask=qm, other=0.0).to(tl.float32)
                        w += qp * tl.load(KOB + oo, mask=om, other=0.0)[None, :]
                    hit = (ot[:, None] == tl.arange(0, BN)[None, :]).to(tl.float32)
                    s += _mm(w * scale, hit, PREC, False)  # tf32 where the model is 16-bit: as precise as its scores
            valid = jm[:, None] & (tin & (t >= skip))[None, :]
            if HAS_MASK:
                mv = tl.load(MASK + bidx * sm_b + iq[:, None] * sm_q + (body_col + t)[None, :] * sm_k, mask=valid, other=0)
                valid = valid & (mv != 0)
            p, alpha, m_i, l_i = _softmax_step(s, valid, m_i, l_i)
            v = _dequant(VC, VS, VZ, VL, svc_r, svc_u, svs_r, svs_u, r, t, tin, offs_d, kv, D, VBITS, VAXIS, VG, VLUT, VUT, VROWS, BN)
            acc = acc * alpha[:, None] + _mm(p.to(DT), v.to(DT), PREC, UP)
            if VSEP:
                accx = accx * alpha[:, None]
            if HAS_VO:  # out[:, c] += p[:, t] δ for each value outlier (t, c) of this row and tile
                lo = tl.load(VOP + r * (n_tiles + 1) + tile)
                hi = tl.load(VOP + r * (n_tiles + 1) + tile + 1)
                for o0 in range(lo, hi, OB):
                    oo = o0 + tl.arange(0, OB)
                    om = oo < hi
                    ot = tl.load(VOT + oo, mask=om, other=-1).to(tl.int32)
                    oc = tl.load(VOC + oo, mask=om, other=-1).to(tl.int32)
                    hit_t = (tl.arange(0, BN)[:, None] == ot[None, :]).to(tl.float32)
                    po = _mm(p, hit_t, PREC, False) * tl.load(VOD + oo, mask=om, other=0.0)[None, :]
                    hit_c = (oc[:, None] == offs_d[None, :]).to(tl.float32)
                    x = _mm(po, hit_c, PREC, False)
                    if VSEP:
                        accx += x
                    else:
                        acc += x
        o = out + split * nq
        tl.store(MO + o, m_i, mask=jm)
        tl.store(LO + o, l_i, mask=jm)
        tl.store(AO + o[:, None] * D + offs_d[None, :], acc, mask=jm[:, None] & dm[None, :])
        if VSEP:
            o = out + (n_splits + 1 + split) * nq
            tl.store(MO + o, m_i, mask=jm)
            tl.store(LO + o, tl.zeros([BM], tl.float32), mask=jm)
            tl.store(AO + o[:, None] * D + offs_d[None, :], accx, mask=jm[:, None] & dm[None, :])
    else:
        m_i, l_i, acc = _raw_piece(q, m_i, l_i, acc, A_K, A_V, sa_kr, sa_kt, sa_vr, sa_vt, a_n, a_col, r, iq, jm, bidx,
                                   offs_d, dm, MASK, sm_b, sm_q, sm_k, HAS_MASK, False, BN, PREC, UP)
        m_i, l_i, acc = _raw_piece(q, m_i, l_i, acc, B_K, B_V, sb_kr, sb_kt, sb_vr, sb_vt, b_n, b_col, r, iq, jm, bidx,
                                   offs_d, dm, MASK, sm_b, sm_q, sm_k, HAS_MASK, False, BN, PREC, UP)
        m_i, l_i, acc = _raw_piece(q, m_i, l_i, acc, C_K, C_V, sc_kr, sc_kt, sc_vr, sc_vt, c_n, c_col, r, iq, jm, bidx,
                                   offs_d, dm, MASK, sm_b, sm_q, sm_k, HAS_MASK, True, BN, PREC, UP)
        o = out + n_splits * nq
        tl.store(MO + o, m_i, mask=jm)
        tl.store(LO + o, l_i, mask=jm)
        tl.store(AO + o[:, None] * D + offs_d[None, :], acc, mask=jm[:, None] & dm[None, :])


@triton.jit
def merge_kernel(MO, LO, AO, HT, OUT, so_b, so_i, so_h, nq, ql, heads, group, n_slots, n_rot,
                 D: tl.constexpr, DP: tl.constexpr, BJ: tl.constexpr, HAS_ROT: tl.constexpr):
    """Grid (query blocks, rows): softmax-merge the partial slots and write the output.

    Slots ``0 .. n_rot-1`` hold outputs in the rotated value domain; they are summed, then
    un-rotated once (``@ Hᵀ``) and added to the plain-domain rest.
    """
    pid = tl.program_id(0)
    r = tl.program_id(1).to(tl.int64)
    offs_j = pid * BJ + tl.arange(0, BJ)
    jm = offs_j < nq
    offs_d = tl.arange(0, DP)
    dm = offs_d < D
    am = jm[:, None] & dm[None, :]
    base = r * n_slots * nq + offs_j
    mx = tl.full([BJ], -1.0e30, tl.float32)
    for s in range(0, n_slots):
        mx = tl.maximum(mx, tl.load(MO + base + s * nq, mask=jm, other=-1.0e30))
    total = tl.zeros([BJ], tl.float32)
    acc = tl.zeros([BJ, DP], tl.float32)
    if HAS_ROT:
        rot = tl.zeros([BJ, DP], tl.float32)
        for s in range(0, n_rot):
            w = tl.exp(tl.load(MO + base + s * nq, mask=jm, other=-1.0e30) - mx)
            total += w * tl.load(LO + base + s * nq, mask=jm, other=0.0)
            rot += w[:, None] * tl.load(AO + (base + s * nq)[:, None] * D + offs_d[None, :], mask=am, other=0.0)
        ht = tl.load(HT + offs_d[:, None] * D + offs_d[None, :], mask=dm[:, None] & dm[None, :], other=0.0)
        acc = tl.dot(rot, ht, input_precision="ieee")
    for s in range(n_rot, n_slots):
        w = tl.exp(tl.load(MO + base + s * nq, mask=jm, other=-1.0e30) - mx)
        total += w * tl.load(LO + base + s * nq, mask=jm, other=0.0)
        acc += w[:, None] * tl.load(AO + (base + s * nq)[:, None] * D + offs_d[None, :], mask=am, other=0.0)
    res = acc / tl.where(total > 0, total, 1.0)[:, None]
    g = offs_j // ql
    i = offs_j % ql
    b = r // heads
    hq = (r % heads) * group + g
    ptr = OUT + b * so_b + i[:, None] * so_i + hq[:, None] * so_h + offs_d[None, :]
    tl.store(ptr, res.to(OUT.dtype.element_ty), mask=am)


if type(_mm).__name__ == "InterpretedFunction":  # pragma: no cover - CPU tests only
    # Under the interpreter every call of a nested jit function re-patches triton.language (~2 ms);
    # the kernels' own call already did, so the helpers run as the plain Python they are.
    _dequant, _mm, _softmax_step, _raw_piece = _dequant.fn, _mm.fn, _softmax_step.fn, _raw_piece.fn
