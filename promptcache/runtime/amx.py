"""A bf16 linear on Intel AMX tiles: the kernel of the fast path's prepacked weights where the CPU has AMX.

Why: a short forward (a 16-token suffix, a decode step) is bound by streaming the weights, and
oneDNN's packed bf16 linear streams them at ~10 GB/s on one core of this machine kind, where a
plain read runs at 13-17 GB/s. This kernel walks each weight once, 32 output columns at a time,
in the layout AMX reads directly, and keeps up with inductor's own AMX GEMM template (which
needs frozen weights: a copy per compiled graph and no on-disk graph cache). Measured by
``benchmarks/prepack.py`` and ``benchmarks/fastpath.py`` (``bf16-compiled-onednn``).

How: a weight ``[N, K]`` is packed once as ``[ceil(N/32), K/2, 32, 2]`` (32-column blocks, pairs of
K interleaved: AMX's VNNI layout; N padded with zero rows). For each block of 32 columns and 32
input rows, two 16-row A tiles and two 16-column B tiles accumulate fp32 in four C tiles over K
(``TDPBF16PS``); the block is rounded to bf16 (plus the bias) once. Long inputs take the columns
in chunks whose weight stays in cache while every row passes. The C++ source is built on first use by
inductor's ``CppPythonBindingsCodeCache`` (the compiler ``torch.compile`` uses; the library is
cached on disk with inductor's), and called with the tensors themselves (no ctypes marshalling).

Applies to bf16 weights whose input width is a multiple of 32 on a CPU with AMX (and a compiler);
:func:`unavailable` says why not otherwise, and the caller keeps oneDNN's packed linear.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

#: Output columns per block (two 16-column tiles; input rows go 32 at a time, two 16-row tiles).
COLUMNS = 32
#: Column blocks per chunk (what matters for inputs longer than one row block): 16 x 32 columns of a
#: weight with 576 inputs is 576 KiB, which stays in L2 while every row block passes (1,149 rows
#: through 150 weights of 1,536 x 576: 259 ms vs oneDNN's 274; 4 blocks: 380 ms; one-off
#: microbenchmark, one thread).
CHUNK_BLOCKS = 16

#: What every AMX kernel source here starts with: headers, the target attribute, the tile configuration.
KERNEL_PREAMBLE = r"""
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#ifdef _OPENMP
#include <omp.h>
#endif

#define PC_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16,avx512dq")))

struct alignas(64) TileConfig {
  uint8_t palette_id, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
"""

KERNEL_SOURCE = KERNEL_PREAMBLE + r"""
// Tiles 0,1: C of rows 0..15 (columns 0..15, 16..31); 2,3: C of rows 16..31; 4, 5: A of rows
// 0..15, 16..31; 6, 7: B (16 VNNI pairs of K x 16 columns each).
PC_TARGET static void configure(int r0, int r1) {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  const int rows[8] = {r0, r0, r1, r1, r0, r1, 16, 16};
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = (uint8_t)rows[t];
    cfg.colsb[t] = rows[t] ? 64 : 0;
  }
  _tile_loadconfig(&cfg);
}

PC_TARGET static void store_rows(const float* acc, const uint16_t* bias, uint16_t* out, int rows,
                                 int64_t ldo, int64_t n0, int64_t width) {
  for (int r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < width; c += 16) {
      const int64_t w = (width - c) < 16 ? (width - c) : 16;
      const __mmask16 mask = (__mmask16)((1u << w) - 1u);
      __m512 v = _mm512_loadu_ps(acc + r * 32 + c);
      if (bias) {
        const __m256i b = _mm256_maskz_loadu_epi16(mask, bias + n0 + c);
        v = _mm512_add_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)));
      }
      _mm256_mask_storeu_epi16(out + r * ldo + n0 + c, mask, (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
}

// Columns [c0, c1) of out for every row, ``chunk`` columns at a time (each chunk's weight stays in
// cache while every row block passes).
PC_TARGET static void columns(const uint16_t* A, const uint16_t* B, const uint16_t* bias, uint16_t* out,
                              int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldo,
                              int64_t c0, int64_t c1, int64_t chunk) {
  alignas(64) float acc[32 * 32];
  int cfg0 = -1, cfg1 = -1;
  for (int64_t s0 = c0; s0 < c1; s0 += chunk) {
    const int64_t s1 = (s0 + chunk) < c1 ? (s0 + chunk) : c1;
    for (int64_t m0 = 0; m0 < M; m0 += 32) {
      const int64_t left = M - m0;
      const int r0 = (int)(left < 16 ? left : 16);
      const int r1 = (int)(left - r0 < 16 ? left - r0 : 16);
      if (r0 != cfg0 || r1 != cfg1) { configure(r0, r1); cfg0 = r0; cfg1 = r1; }
      const uint16_t* a = A + m0 * lda;
      for (int64_t n0 = s0; n0 < s1; n0 += 32) {
        const uint16_t* b = B + n0 * K;
        const int64_t width = (N - n0) < 32 ? (N - n0) : 32;
        _tile_zero(0); _tile_zero(1);
        if (r1) { _tile_zero(2); _tile_zero(3); }
        for (int64_t k = 0; k < K; k += 32) {
          _tile_loadd(6, b + k * 32, 128);
          _tile_loadd(7, b + k * 32 + 32, 128);
          _tile_loadd(4, a + k, lda * 2);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          if (r1) {
            _tile_loadd(5, a + 16 * lda + k, lda * 2);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
          }
        }
        _tile_stored(0, acc, 128);
        _tile_stored(1, acc + 16, 128);
        store_rows(acc, bias, out + m0 * ldo, r0, ldo, n0, width);
        if (r1) {
          _tile_stored(2, acc + 16 * 32, 128);
          _tile_stored(3, acc + 16 * 32 + 16, 128);
          store_rows(acc + 16 * 32, bias, out + (m0 + 16) * ldo, r1, ldo, n0, width);
        }
      }
    }
  }
  _tile_release();
}

// out[M, N] = A[M, K] @ W[N, K]^T (+ bias): bf16 in and out, fp32 accumulation. B is W packed as
// [ceil(N/32)][K/2][32][2]; K % 32 == 0; lda, ldo in elements; chunk: columns (a multiple of 32)
// walked together; threads > 1 splits the chunks between OpenMP threads.
void kernel(const uint16_t* A, const uint16_t* B, const uint16_t* bias, uint16_t* out,
            int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldo, int64_t has_bias,
            int64_t chunk, int64_t threads) {
  const uint16_t* b = has_bias ? bias : nullptr;
  const int64_t blocks = (N + 31) / 32;
#ifdef _OPENMP
  if (threads > 1 && blocks > 1) {
    const int64_t parts = threads < blocks ? threads : blocks;
    #pragma omp parallel for num_threads((int)parts) schedule(static)
    for (int64_t i = 0; i < parts; ++i) {
      const int64_t c0 = blocks * i / parts * 32, c1 = blocks * (i + 1) / parts * 32;
      columns(A, B, b, out, M, N, K, lda, ldo, c0, c1 < N ? c1 : N, chunk);
    }
    return;
  }
#endif
  columns(A, B, b, out, M, N, K, lda, ldo, 0, N, chunk);
}
"""

_ARGTYPES = ("const uint16_t*", "const uint16_t*", "const uint16_t*", "uint16_t*",
             "int64_t", "int64_t", "int64_t", "int64_t", "int64_t", "int64_t", "int64_t", "int64_t")


@dataclass(frozen=True)
class AmxWeight:
    """A weight ``[N, K]`` packed for :func:`linear`: ``blocks`` ``[ceil(N/32), K/2, 32, 2]``."""

    blocks: torch.Tensor
    out_features: int
    in_features: int


@functools.lru_cache(maxsize=None)
def build(source: str, argtypes: tuple[str, ...]) -> tuple[object | None, str | None]:
    """An AMX kernel built from C++ ``source`` (entry point ``kernel``), or why there is none; once
    per process and source (inductor caches the library on disk)."""
    capabilities = torch.cpu.get_capabilities()
    if not (capabilities.get("amx_tile") and capabilities.get("amx_bf16") and capabilities.get("avx512_bf16")):
        return None, "this CPU has no AMX bf16 tiles"
    if not torch.cpu._init_amx():
        return None, "the OS did not grant AMX tile state to this process"
    try:
        from torch._inductor.codecache import CppPythonBindingsCodeCache

        return CppPythonBindingsCodeCache.load_pybinding(list(argtypes), source), None
    except Exception as exc:  # no compiler, an old one without AMX intrinsics: the caller's fallback runs
        return None, f"the AMX kernel did not build ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"


@functools.lru_cache(maxsize=None)
def _build() -> tuple[object | None, str | None]:  # the linear's, without hashing the source per call
    return build(KERNEL_SOURCE, _ARGTYPES)


def unavailable(weight: torch.Tensor) -> str | None:
    """``None`` when ``weight`` can run on this kernel, else why not."""
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or weight.dim() != 2:
        return "the AMX kernel takes 2-D bf16 CPU weights"
    if weight.shape[1] % COLUMNS:
        return f"input width {weight.shape[1]} is not a multiple of {COLUMNS}"
    return _build()[1]


def pack(weight: torch.Tensor) -> AmxWeight:
    """``weight`` ``[N, K]`` in the kernel's layout (a new tensor; the weight is left as it is)."""
    n, k = weight.shape
    padded = -(-n // COLUMNS) * COLUMNS
    with torch.no_grad():
        w = torch.nn.functional.pad(weight.detach(), (0, 0, 0, padded - n))
        blocks = w.view(padded // COLUMNS, COLUMNS, k // 2, 2).permute(0, 2, 1, 3).contiguous()
    return AmxWeight(blocks, n, k)


#: Kernel calls in this process (the profiler cannot see them: they are not aten ops); for tests.
calls = 0
#: Columns walked together (:data:`CHUNK_BLOCKS` blocks).
_CHUNK = COLUMNS * CHUNK_BLOCKS


def linear(x: torch.Tensor, weight: AmxWeight, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear(x, W, bias)`` for the packed ``W``: bf16 ``x`` of any leading shape, a bf16 ``bias``.
    Kept to a few tensor calls: it runs ~120 times per forward of a 135M model (~5 us each)."""
    global calls
    if not x.is_contiguous():
        x = x.contiguous()
    k, n = weight.in_features, weight.out_features
    out = x.new_empty((*x.shape[:-1], n))
    m = x.numel() // k
    if m:
        calls += 1
        _build()[0](x, weight.blocks, x if bias is None else bias, out, m, n, k, k, n, bias is not None,
                    _CHUNK, torch.get_num_threads())
    return out
