"""packed_products's PTX, run by a small emulator of the instructions it uses (tests/ptx_emulator.py: no GPU
here): the register table decodes every nibble of a word to its code, in the stored order
(the byte's high nibble is the even column), and the word's sum is its eight products.

The GPU side is checked where it runs: the tuner compares a register-table candidate's output with its float32
default before it may pick it, and bench/check_fast_batch.py compares 4-bit logits with the eager model."""

from __future__ import annotations

import pytest
import torch

from backend.kernels import gemv_4bit as Q
from backend.kernels import packed_products as PP
from ptx_emulator import run_ptx

NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def _halves(v, dtype) -> list[float]:
    v = int(v)
    return torch.tensor([v & 0xFFFF, v >> 16], dtype=torch.int32).to(torch.int16).view(dtype).float().tolist()


def _pack(a: float, b: float, dtype) -> int:
    lo, hi = (int(v) & 0xFFFF for v in torch.tensor([a, b], dtype=torch.float64).to(dtype).view(torch.int16).tolist())
    return lo | hi << 16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("code", [NF4, PP.INT4_CODE], ids=["nf4", "int4"])
def test_each_nibble_decodes_to_its_code_in_stored_order(dtype, code):
    planes = PP.byte_planes(code, dtype)
    rounded = torch.tensor(code).to(dtype).float().tolist()
    g = torch.Generator().manual_seed(0)
    for word in [0x01234567, 0x89ABCDEF, 0xFEDCBA98] + torch.randint(0, 2**31, (20,), generator=g).tolist():
        # activation pair p = columns (2p, 2p + 1) of the word: one-hot pairs read each weight back
        for p in range(4):
            for lane, column in ((0, 2 * p), (1, 2 * p + 1)):
                xs = [0] * 4
                xs[p] = _pack(1.0 if lane == 0 else 0.0, 1.0 if lane == 1 else 0.0, dtype)
                operands = {"$1": word, **{f"${2 + i}": xs[i] for i in range(4)},
                            **{f"${6 + i}": planes[i] & 0xFFFFFFFF for i in range(8)}}
                got = run_ptx(PP.dot_asm(1, dtype == torch.bfloat16), operands)["$0"]
                byte = (word >> 8 * (column // 2)) & 0xFF
                nibble = byte >> 4 if column % 2 == 0 else byte & 15
                assert got == rounded[nibble], (hex(word), column)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_words_sum_is_its_eight_products_for_each_of_two_rows(dtype):
    planes = PP.byte_planes(NF4, dtype)
    g = torch.Generator().manual_seed(1)
    word = 0x9C3F0A65
    codes = [NF4[(word >> 8 * (c // 2) + (4 if c % 2 == 0 else 0)) & 15] for c in range(8)]
    rows = torch.randn(2, 8, generator=g).to(dtype).float()
    pairs = [[_pack(float(r[2 * p]), float(r[2 * p + 1]), dtype) for p in range(4)] for r in rows]
    operands = {"$2": word, **{f"${3 + i}": pairs[0][i] for i in range(4)},
                **{f"${7 + i}": pairs[1][i] for i in range(4)}, **{f"${11 + i}": planes[i] & 0xFFFFFFFF for i in range(8)}}
    regs = run_ptx(PP.dot_asm(2, dtype == torch.bfloat16), operands)
    for r, out in enumerate(("$0", "$1")):
        expected = sum(c * float(x) for c, x in zip(codes, rows[r]))
        assert regs[out] == pytest.approx(expected, rel=2e-2, abs=2e-2)


def test_the_norm_product_is_rounded_once_as_the_other_kernels_round_it():
    for dtype in (torch.bfloat16, torch.float16):
        x, gain = torch.randn(2).to(dtype), torch.randn(2).to(dtype)
        operands = {"$1": _pack(*x.tolist(), dtype), "$2": _pack(*gain.tolist(), dtype)}
        regs = run_ptx(PP.mul_asm(dtype == torch.bfloat16), operands)
        assert _halves(regs["$0"], dtype) == (x.float() * gain.float()).to(dtype).float().tolist()


def _int8_words(values: list[int]) -> tuple[int, int]:
    raw = bytes(v & 0xFF for v in values)
    return int.from_bytes(raw[:4], "little"), int.from_bytes(raw[4:], "little")


def test_int8_bytes_widen_to_exactly_a_128th_in_column_order():
    for values in ([-128, -127, -1, 0, 1, 63, 126, 127], [5, -7, 100, -100, 42, -42, 0, -128]):
        lo, hi = _int8_words(values)
        for column in range(8):
            xs = [0] * 4
            xs[column // 2] = _pack(1.0 if column % 2 == 0 else 0.0, 1.0 if column % 2 else 0.0, torch.float16)
            regs = run_ptx(PP.int8_dot_asm(1), {"$1": lo, "$2": hi, **{f"${3 + i}": xs[i] for i in range(4)}})
            assert regs["$0"] == values[column] / 128, (values, column)


def test_int8_sums_of_two_rows_are_their_products_over_128():
    g = torch.Generator().manual_seed(2)
    values = torch.randint(-128, 128, (8,), generator=g).tolist()
    rows = torch.randn(2, 8, generator=g).half().float()
    pairs = [[_pack(float(r[2 * p]), float(r[2 * p + 1]), torch.float16) for p in range(4)] for r in rows]
    lo, hi = _int8_words(values)
    regs = run_ptx(PP.int8_dot_asm(2), {"$2": lo, "$3": hi, **{f"${4 + i}": pairs[0][i] for i in range(4)},
                                        **{f"${8 + i}": pairs[1][i] for i in range(4)}})
    for r, out in enumerate(("$0", "$1")):
        expected = sum(v * float(x) for v, x in zip(values, rows[r])) / 128
        assert regs[out] == pytest.approx(expected, rel=2e-2, abs=2e-3)


def test_the_matmul_widens_every_int8_byte_to_its_exact_fp16_value():
    for value in range(-128, 128):
        for lane in range(4):
            packed = (value & 0xFF) << 8 * lane | (0x5A << 8 * ((lane + 1) % 4))  # a neighbour byte beside it
            regs = run_ptx(PP.widen_int8_asm(), {"$2": packed})
            halves = _halves(regs["$0"], torch.float16) + _halves(regs["$1"], torch.float16)
            assert halves[lane] == value and halves[(lane + 1) % 4] == 0x5A, (value, lane)


def test_a_code_of_the_wrong_length_is_refused():
    with pytest.raises(ValueError, match="16 values"):
        PP.byte_planes([0.0] * 8, torch.float16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("code", [NF4, PP.INT4_CODE], ids=["nf4", "int4"])
def test_the_shared_table_decodes_every_byte_as_the_register_table_does(dtype, code):
    """lut 4: the table declared, filled (pair_words at word 32b + lane) and read back through shared_dot_asm gives
    each word the register table's sum, for one row and two; the weight constructors make its entries."""
    bf16 = dtype == torch.bfloat16
    base = int(run_ptx(PP.shared_table_asm(), {"$1": 0})["$0"])
    pairs = PP.pair_words(code, dtype)
    words = torch.arange(PP.TABLE_WORDS)
    run_ptx(PP.store_shared_asm(), {"$1": (base + 4 * words).numpy(), "$2": pairs[words // 32].numpy()})
    lane_table = base + int(run_ptx(PP.lane_offset_asm(), {"$1": 0})["$0"])
    planes = [p & 0xFFFFFFFF for p in PP.byte_planes(code, dtype)]
    g = torch.Generator().manual_seed(2)
    for word in [0x01234567, 0x89ABCDEF] + torch.randint(0, 2**31, (10,), generator=g).tolist():
        rows = torch.randn(2, 8, generator=g).to(dtype).float()
        x = [[_pack(float(r[2 * p]), float(r[2 * p + 1]), dtype) for p in range(4)] for r in rows]
        one = run_ptx(PP.shared_dot_asm(1, bf16), {"$1": word, **{f"${2 + i}": x[0][i] for i in range(4)},
                                                    "$6": lane_table})["$0"]
        two = run_ptx(PP.shared_dot_asm(2, bf16), {"$2": word, **{f"${3 + i}": x[0][i] for i in range(4)},
                                                    **{f"${7 + i}": x[1][i] for i in range(4)}, "$11": lane_table})
        want = [run_ptx(PP.dot_asm(1, bf16), {"$1": word, **{f"${2 + i}": x[r][i] for i in range(4)},
                                              **{f"${6 + i}": planes[i] for i in range(8)}})["$0"] for r in range(2)]
        assert one == want[0] and two["$0"] == want[0] and two["$1"] == want[1], hex(word)
    q = Q.int4_release_weight(torch.zeros(4, 16, dtype=torch.int8), torch.ones(4, dtype=torch.float16))
    assert torch.equal(q.shared_pairs(dtype), PP.pair_words(PP.INT4_CODE, dtype))
