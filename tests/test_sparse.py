import torch

from streamkv.kv.storage.sparse import SparseOutliers


def test_offsets_survive_many_appends_past_the_int16_range():
    rows, dim = 3, 64
    s = SparseOutliers(8, rows, dim)
    dense_ref = torch.zeros(rows, 0, dim)
    planted = 0
    for chunk in range(6):  # 6 * 300 tokens * 192 values > 2**15 several times over
        x = torch.randn(rows, 300, dim)
        mask = torch.rand_like(x) < 0.01
        s.append(x, mask)
        planted += int(mask.sum())
        dense_ref = torch.cat([dense_ref, torch.where(mask, x, torch.zeros_like(x))], 1)
    restored = s.scatter_into(torch.zeros_like(dense_ref))
    scale = dense_ref.abs().max() / 127
    assert ((restored - dense_ref).abs() <= scale).all()
    assert s.count == planted
    assert s.low.dtype == torch.int16 and s.nbytes < s.count * 3.1  # ~3 bytes per outlier


def test_sixteen_bit_outliers_are_exact_in_fp16():
    s = SparseOutliers(16, 2, 8)
    x = torch.randn(2, 5, 8)
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[1, 4, 7] = mask[0, 0, 0] = True
    s.append(x, mask)
    out = s.scatter_into(torch.zeros_like(x))
    assert torch.equal(out[mask], x[mask].half().float()) and out[~mask].abs().sum() == 0


def test_mask_questions_answer_as_torchs_boolean_reductions():
    from streamkv.kv.storage.masks import any_set, whole_tokens

    mask = torch.rand(3, 40, 64) < 0.05
    mask[:, :4] = True  # sinks: whole tokens
    mask[1, 7] = True
    assert torch.equal(whole_tokens(mask), mask.all(-1, keepdim=True))
    assert any_set(mask) and not any_set(torch.zeros_like(mask)) and not any_set(None)
