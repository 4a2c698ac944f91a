"""Compare's two rows: each quantized linear's kernel for two activation rows, tuned inside the captured two-row step
(``step_tuning``), cached per GPU model.

Two rows are a compare (the app's two columns in one batch) or a server's first two streams. Each linear's pick at
two rows was made timing that linear alone: for int8 weights among ``gemv_rows``' tiles and the int8 matmul path
(its own RMSNorm launch and a split-K sum), for 4-bit ones among ``quant_linear``'s tiles. On the H100 those picks
left the two-row step at ~3.17 ms, where compare's 1.8x one reply needs <= 3.09 ms (bench/NOTES.md run 42); one
row's step gained 12% from the same descent in its graph (run 5). Here each kind starts from its pick made alone
(None) and is tuned among:

- int8 weights: ``gemv_rows``' candidates (its own GEMV and the words kernel; the norm in its prologue, the
  residual or SwiGLU in its epilogue) and ``OTHER``, the matmul path;
- 4-bit weights: ``quant_linear``'s words tiles for two rows.

16-bit layers go through cuBLAS at two rows: nothing to pick. ``GLMCHAT_KERNEL_TUNING=0`` keeps the picks made alone.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from ..kernels import gemv_rows, packed_products
from ..kernels.gemv_4bit import QuantLinearConfig, candidate_configs
from ..kernels.gemv_rows import RowsGemvConfig
from . import one_row_tuning, step_tuning

Tile = Optional[Union[RowsGemvConfig, QuantLinearConfig]]

KINDS = ("fc1", "fc2", "qkv", "dense")  # the biggest weights first (the output layer is 16-bit in every checkpoint)
OTHER = RowsGemvConfig(kernel="other")  # int8: the matmul path (``BatchLinear._matmul_path``)


def _linears(decoder) -> dict[str, list]:
    by_kind = one_row_tuning.linears_by_kind(decoder)
    return {kind: by_kind[kind] for kind in KINDS}


def candidates_for(decoder) -> dict[str, list]:
    """Each tunable kind's candidates for this decoder's weights, in descent order; 16-bit kinds are left out."""
    out = {}
    for kind, lins in _linears(decoder).items():
        lin, swiglu = lins[0], kind == "fc1"
        if lin.q is None:
            continue
        if lin.q.fmt == "int8":
            if lin.rows_gemv:
                tiles = gemv_rows.candidate_configs(swiglu)
                if decoder.dtype != torch.float16:  # (packed fp16 products: fp16 rows only)
                    tiles = [c for c in tiles if not (c.kernel == "words" and c.cvt == 3)]
                out[kind] = tiles + [OTHER]
        else:
            table = decoder.dtype in lin.q.table_registers and packed_products.tried()
            out[kind] = [c for c in candidate_configs(lin.q.fmt, 2, swiglu)
                         if c.kernel == "words" and (c.lut != 3 or table)]
    return out


def apply(decoder, configs: dict[str, Tile]) -> None:
    """Every linear of each kind in ``configs`` runs that tile at two rows from the next capture on."""
    for kind, lins in _linears(decoder).items():
        if kind in configs:
            for lin in lins:
                lin.two_rows = configs[kind]


def _parse(kind: str, fields: dict) -> Tile:
    return QuantLinearConfig(**fields) if "block_m" in fields else RowsGemvConfig(**fields)


def step_tiles(decoder) -> step_tuning.StepTiles:
    """The two-row step's tiles as the descent reads them: each kind starts from its pick made alone (None)."""
    candidates = candidates_for(decoder)
    return step_tuning.StepTiles("two-row", one_row_tuning.tuning_key(decoder, "two_row_step"),
                                 {kind: None for kind in candidates}, candidates,
                                 lambda configs: apply(decoder, configs), _parse)


def applies(decoder) -> bool:
    """Whether the two-row step has quantized linears whose kernel is picked (an 8-bit or 4-bit model)."""
    return bool(candidates_for(decoder))


def cached(decoder) -> Optional[dict[str, Tile]]:
    """This card's winners for this step, if they were picked from today's candidates (else: tune again)."""
    return step_tuning.cached(step_tiles(decoder), decoder.device)


def tune(decoder, measure: Callable[[dict], Callable[[], float]]) -> dict[str, Tile]:
    """The descent for this decoder's weights, the winners applied and stored for later starts on this GPU model."""
    return step_tuning.tune(step_tiles(decoder), decoder.device, measure)
