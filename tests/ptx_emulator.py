"""A small emulator of the PTX instructions ``backend/kernels/packed_products.py`` emits, vectorized over NumPy
arrays, and a hook that lets Triton's interpreter run that inline assembly through it. ``weight_prefetch``'s prefetches
change nothing; the emulator records the ranges they ask for (``PREFETCHED``) for the tests to check.

Why: Triton's interpreter cannot run inline assembly, so without this the kernels that multiply packed weights two
at a time (the int8 GEMV's CVT 3, the words kernel's register table) were checked only on a GPU. With
``interpreted_inline_ptx`` a CPU test runs those kernels whole, their loops, masks and epilogues included.

Registers hold uint32 arrays (``.f32`` results: float32 arrays; 64-bit operands, the prefetches' addresses: uint64). The 16-bit lanes are rounded as the GPU rounds
them (once a product-and-add, in the lane's type).
"""

from __future__ import annotations

import contextlib
import re

import numpy as np
import torch

_LANE_DTYPES = {"f16x2": torch.float16, "bf16x2": torch.bfloat16}


def _u32(v) -> np.ndarray:
    return np.asarray(v).astype(np.int64).astype(np.uint32)


def _halves(v: np.ndarray, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The low and high 16-bit lanes of uint32 ``v`` as float64 values of ``dtype``."""
    bits = torch.from_numpy(_u32(v).astype(np.int64))
    lane = lambda b: (b & 0xFFFF).to(torch.int16).view(dtype).double()  # noqa: E731
    return lane(bits), lane(bits >> 16)


def _pack(lo: torch.Tensor, hi: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """Two float tensors rounded to ``dtype`` and packed as uint32 (lo in the low lane)."""
    bits = lambda t: t.to(torch.float32).to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF  # noqa: E731
    return _u32((bits(lo) | bits(hi) << 16).numpy())


def _prmt(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    source = _u32(b).astype(np.uint64) << np.uint64(32) | _u32(a).astype(np.uint64)
    c = _u32(c)
    out = np.zeros(np.broadcast(source, c).shape, dtype=np.uint64)
    for k in range(4):
        sel = (c >> np.uint32(4 * k)) & np.uint32(15)
        if np.any(sel & 8):  # sign-replicate mode: the emitted code must never use it
            raise AssertionError("prmt selector with bit 3 set")
        byte = (source >> (sel.astype(np.uint64) * np.uint64(8))) & np.uint64(0xFF)
        out |= byte << np.uint64(8 * k)
    return out.astype(np.uint32)


def _lop3(a: np.ndarray, b: np.ndarray, c: np.ndarray, lut: int) -> np.ndarray:
    a, b, c = _u32(a), _u32(b), _u32(c)
    out = np.zeros(np.broadcast(a, b, c).shape, dtype=np.uint32)
    for index in range(8):
        if (int(lut) >> index) & 1:
            term = (a if index & 4 else ~a) & (b if index & 2 else ~b) & (c if index & 1 else ~c)
            out |= term
    return out


PREFETCHED: list[tuple[int, int]] = []  # (address, bytes) of each emulated bulk prefetch, in order


def _f32(v: np.ndarray) -> np.ndarray:
    return v if v.dtype == np.float32 else _u32(v).view(np.float32)


# shared memory declared by the emulated assembly: name -> (its address, its 32-bit words). One thread is emulated
# (%laneid is 0): the shared table's 32 replicas hold the same values, so any lane's reads give the same products
_SHARED: dict[str, tuple[int, np.ndarray]] = {}
_SHARED_BASE = 0x400  # (not 0: an address computed without the table's base reads outside it and fails)


def _shared_access(address: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The words array holding shared ``address`` (one declared array) and the word indices."""
    ((base, words),) = _SHARED.values()
    index = (address.astype(np.int64) - base) // 4
    if np.any(address % 4) or np.any(index < 0) or np.any(index >= words.size):
        raise AssertionError("a shared access outside the declared table, or unaligned")
    return words, index


def _declare_shared(line: str) -> None:
    m = re.match(r"\.shared\s+(?:\.align\s+\d+\s+)?\.b32\s+(\w+)\[(\d+)\]", line)
    if not m:
        raise AssertionError(f"the emulator does not know {line}")
    _SHARED.clear()
    _SHARED[m.group(1)] = (_SHARED_BASE, np.zeros(int(m.group(2)), dtype=np.uint32))


def run_ptx(text: str, operands: dict[str, object]) -> dict[str, np.ndarray]:
    """Execute the instructions packed_products emits over arrays (operands: ``$n`` -> int or array)."""
    regs: dict[str, np.ndarray] = {
        k: (v if isinstance(v, np.ndarray) and v.dtype in (np.float32, np.uint64) else _u32(v))
        for k, v in operands.items()}

    def val(t: str) -> np.ndarray:
        if t in _SHARED:
            return _u32(_SHARED[t][0])
        if t in ("%laneid", "%tid.x"):  # (one thread: the first)
            return _u32(0)
        return regs[t] if t in regs else _u32(int(t, 0))

    for line in text.splitlines():
        line = line.strip().rstrip(";")
        if line.startswith(".shared"):
            _declare_shared(line)
            continue
        if not line or line[0] in "{}." or line.startswith("//"):
            continue
        if line.startswith("@"):  # a predicated instruction: run where the predicate holds (the one thread's)
            guard, line = line.split(None, 1)
            if not np.all(regs[guard[1:]]):
                continue
        op, rest = line.split(None, 1)
        args = [a.strip() for a in re.split(r",(?![^{]*})", rest)]
        dst = args[0]
        if op == "cp.async.bulk.prefetch.L2.global":
            (start,), (size,) = np.unique(val(dst.strip("[]"))), np.unique(val(args[1]))  # (a scalar's instances)
            PREFETCHED.append((int(start), int(size)))
            continue
        if op == "setp.eq.u32":
            regs[dst] = val(args[1]) == val(args[2])
            continue
        if op == "st.shared.b32":
            words, index = _shared_access(np.broadcast_to(val(dst.strip("[]")), np.shape(val(args[1]))))
            words[index] = val(args[1])
            continue
        if op == "ld.shared.b32":
            words, index = _shared_access(val(args[1].strip("[]")))
            regs[dst] = words[index]
            continue
        src = [val(a) for a in args[1:] if not a.startswith("{")]
        if op == "mad.lo.u32":
            regs[dst] = _u32(src[0].astype(np.uint64) * src[1].astype(np.uint64) + src[2].astype(np.uint64))
        elif op == "and.b32":
            regs[dst] = src[0] & src[1]
        elif op == "xor.b32":
            regs[dst] = src[0] ^ src[1]
        elif op == "shr.u32":
            regs[dst] = src[0] >> src[1]
        elif op == "shl.b32":
            regs[dst] = _u32(src[0].astype(np.uint64) << src[1].astype(np.uint64))
        elif op == "lop3.b32":
            regs[dst] = _lop3(src[0], src[1], src[2], int(src[3]))
        elif op == "prmt.b32":
            regs[dst] = _prmt(*src)
        elif op == "mov.b32" and dst.startswith("{"):
            lo, hi = dst.strip("{}").replace(" ", "").split(",")
            regs[lo], regs[hi] = val(args[1]) & np.uint32(0xFFFF), val(args[1]) >> np.uint32(16)
        elif op in ("mov.b32", "mov.u32"):
            regs[dst] = src[0]
        elif op == "add.rn.f16x2":
            (a0, a1), (b0, b1) = (_halves(v, torch.float16) for v in src)
            regs[dst] = _pack(a0 + b0, a1 + b1, torch.float16)
        elif op.startswith("fma.rn."):
            dtype = _LANE_DTYPES[op.split(".")[-1]]
            (a0, a1), (b0, b1), (c0, c1) = (_halves(v, dtype) for v in src)
            regs[dst] = _pack(a0 * b0 + c0, a1 * b1 + c1, dtype)
        elif op == "cvt.f32.f16":
            regs[dst] = _halves(src[0], torch.float16)[0].numpy().astype(np.float32)
        elif op == "add.f32":
            regs[dst] = (_f32(src[0]).astype(np.float64) + _f32(src[1])).astype(np.float32)
        else:
            raise AssertionError(f"the emulator does not know {op}")
    return regs


class _AsmCall:
    def __init__(self, results):
        self.results = results

    def get_result(self, i):
        return self.results[i]


def _widen_bytes(asm, values, types):
    """pack 4: one int8 operand, four bytes a register (byte j of a group of four consecutive elements in bits
    8j..8j+7); two output registers of two 16-bit elements each (elements 0-1, then 2-3), as Triton packs them.
    Which elements form a group does not matter to an elementwise asm, so groups are taken in flattened order."""
    from triton.runtime.interpreter import TensorHandle

    (v,) = values
    data = np.ascontiguousarray(v.data)
    if len(types) != 1 or data.dtype.itemsize != 1 or data.size % 4:
        raise NotImplementedError("the emulator packs four bytes into one register, for one 16-bit result")
    regs = run_ptx(asm, {"$2": data.reshape(-1, 4).view(np.uint32).reshape(-1)})
    lanes = [regs["$0"] & np.uint32(0xFFFF), regs["$0"] >> np.uint32(16), regs["$1"] & np.uint32(0xFFFF),
             regs["$1"] >> np.uint32(16)]
    bits = np.stack(lanes, axis=1).astype(np.uint16).reshape(data.shape)
    scalar = types[0].scalar if hasattr(types[0], "scalar") else types[0]
    return _AsmCall([TensorHandle(bits.view(np.float16), scalar)])


def _inline_asm(self, asm, constraints, values, types, is_pure, pack):
    """``InterpreterBuilder.create_inline_asm`` for packed_products' assembly: one element an instance (pack 1),
    32-bit operands, outputs ``=r`` as int32 and ``=f`` as float32; or four bytes widened to 16 bits (pack 4)."""
    from triton.runtime.interpreter import TensorHandle

    if pack == 4:
        return _widen_bytes(asm, values, types)
    if pack != 1:
        raise NotImplementedError("the emulated inline assembly takes one element or four bytes an instance")
    outputs = [c for c in constraints.split(",") if c.startswith("=")]
    shape = np.broadcast(*(v.data for v in values)).shape
    operands = {}
    for i, v in enumerate(values):  # "r" operands: a 32-bit value's bits as they are, a narrower integer widened;
        data = np.broadcast_to(v.data, shape)  # "l" ones (pointers): 64 bits
        operands[f"${len(outputs) + i}"] = (data.view(np.uint32) if data.dtype.itemsize == 4
                                            else data.astype(np.uint64) if data.dtype.itemsize == 8 else _u32(data))
    regs = run_ptx(asm, operands)
    results = []
    for i, (con, ty) in enumerate(zip(outputs, types)):
        scalar = ty.scalar if hasattr(ty, "scalar") else ty
        out = np.broadcast_to(regs[f"${i}"], shape)
        data = _f32(out).astype(np.float32) if con == "=f" else _u32(out).view(np.int32)
        results.append(TensorHandle(np.ascontiguousarray(data), scalar))
    return _AsmCall(results)


@contextlib.contextmanager
def interpreted_inline_ptx():
    """Within: Triton's interpreter runs packed_products' inline assembly through ``run_ptx``."""
    from triton.runtime import interpreter

    real = interpreter.InterpreterBuilder.create_inline_asm
    interpreter.InterpreterBuilder.create_inline_asm = _inline_asm
    try:
        yield
    finally:
        interpreter.InterpreterBuilder.create_inline_asm = real
