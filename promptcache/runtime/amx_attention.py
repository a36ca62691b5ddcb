"""Attention on Intel AMX tiles: the fast path's cached prefills, decode steps and long eager forwards.

Why: torch's CPU flash kernel runs attention in fp32 vector code with one oneDNN GEMM call per
32-row x 512-key block (two per block, for Q K^T and P V): 274 us per SmolLM2 layer for 16 queries
over 1,120 keys, folded; this kernel takes 130 us, a decode step's 64 us take 45, a causal
1,118-token layer's 5.7 ms take 4.2 (one-off microbenchmarks, one thread, hot caches). Measured
end to end by ``benchmarks/fastpath.py`` (``--variants bf16-compiled-flash,bf16-compiled``).

How, per K/V head: K transposed in registers (16 x 16 32-bit words: pairs of dims) into the B tiles
AMX multiplies by, and V with pairs of keys interleaved (AMX's VNNI layout), once; then blocks of
48 // groups queries, the query heads sharing the K/V head folded into one block of <= 48 rows (as
:mod:`.attention` folds them for torch's kernel), each block over the keys it can see:

1. scores S = Q K^T on AMX tiles, 16 keys at a time;
2. softmax rows in fp32 vector code: scale, the additive mask, the row max, exp (a degree-5
   polynomial after range reduction, within 2.4e-6; exactly 0 far below the max), the row sum; the weights rounded
   to bf16 (as torch's kernel rounds them before its P V GEMM);
3. O = P V on tiles, 32 dims at a time, divided by the row sums and written in transformers'
   ``[b, q, heads, d]`` layout.

Work items (K/V heads, then query blocks) are split between OpenMP threads, to the same values.

Same math as the flash kernel (fp32 scores and sums, bf16 weights and values, fp32 accumulation);
``tests/test_amx_attention.py`` checks it against fp32 attention within the error of torch's own
bf16 SDPA. Applies to bf16 on a CPU with AMX, one sequence, head dims a multiple of 32 up to 128,
an additive bf16 mask or none (causal); :func:`unavailable` says why not otherwise (torch's SDPA
then runs).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from . import amx

#: Rows of one folded block (three 16-row tiles of scores, six of outputs): queries are taken
#: 48 // (query heads per K/V head) at a time.
MAX_ROWS = 48
MAX_HEAD_DIM = 128

SOURCE = amx.KERNEL_PREAMBLE + r"""
PC_TARGET static void configure_all() {  // 8 tiles of 16 rows x 64 bytes
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
  _tile_loadconfig(&cfg);
}

PC_TARGET static inline __m512 bf16x16_to_f32(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// rows[s] (16 x 16 uint32) -> rows[p] = column p, in place.
PC_TARGET static inline void transpose16x16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // u[4i + j], lane L = rows 4i..4i+3 at column 4L + j
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int j = 0; j < 4; ++j) {  // column 4L + j, lane G = u[4G + j] lane L
    const __m512i x0 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x44), x1 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xEE);
    const __m512i x2 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x44), x3 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xEE);
    t[j] = _mm512_shuffle_i32x4(x0, x2, 0x88);
    t[4 + j] = _mm512_shuffle_i32x4(x0, x2, 0xDD);
    t[8 + j] = _mm512_shuffle_i32x4(x1, x3, 0x88);
    t[12 + j] = _mm512_shuffle_i32x4(x1, x3, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// exp(x) for x <= 0 (softmax after subtracting the row max); exactly 0 below -87.
PC_TARGET static inline __m512 exp_nonpositive(__m512 x) {
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), f);
  __m512 p = _mm512_set1_ps(1.0f / 120);  // degree 5 on |f| <= ln2 / 2: within 2.4e-6 (weights are bf16)
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(p, n));
}

// Attention of `rows` queries per query head over L keys. Q: (h, i, d) at h * qh + i * qi + d;
// K, V: (kh, s, d) at kh * k_stride + s * D + d; with has_mask, an additive bf16 mask, (i, s) at
// i * mi + s, the same for every head; without, causal: query i sees keys s <= past + i. out:
// (i, h, d) at i * oi + h * D + d. D % 32 == 0, D <= 128. Per K/V head, K is transposed and V
// interleaved once; then blocks of qb queries, the `groups` query heads sharing the K/V head folded
// into R = groups * qb <= 48 rows, each over the keys it can see.
PC_TARGET void kernel(const uint16_t* Q, const uint16_t* K, const uint16_t* V, const uint16_t* mask,
                      uint16_t* out, int64_t kv_heads, int64_t groups, int64_t rows, int64_t L, int64_t D,
                      int64_t qh, int64_t qi, int64_t kh_stride, int64_t vh_stride, int64_t mi, int64_t oi,
                      int64_t has_mask, int64_t past, int64_t threads, float scale) {
  const int64_t qb = 48 / groups < rows ? 48 / groups : rows;  // queries per block
  const int64_t L16 = (L + 15) / 16 * 16, L32 = (L + 31) / 32 * 32, DC = D / 32;
  const int64_t kt_size = L16 / 16 * DC * 256, v_size = L32 * D;  // per K/V head
  std::unique_ptr<uint32_t[]> kt_all(new uint32_t[kv_heads * kt_size]);  // per 16 keys: DC B tiles
  std::unique_ptr<uint16_t[]> v_all(new uint16_t[kv_heads * v_size]);
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                      39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24,
                                      55, 23, 54, 22, 53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);
  #pragma omp parallel for num_threads((int)threads) if (threads > 1 && kv_heads > 1)
  for (int64_t h = 0; h < kv_heads; ++h) {
    uint32_t* ktbuf = kt_all.get() + h * kt_size;
    uint16_t* vbuf = v_all.get() + h * v_size;
    // K^T in B tiles (pairs of dims x 16 keys), 16 keys at a time, transposed in registers
    const uint32_t* k32 = reinterpret_cast<const uint32_t*>(K + h * kh_stride);
    for (int64_t s0 = 0; s0 < L16; s0 += 16) {
      const int64_t n = (L - s0) < 16 ? (L - s0) : 16;
      for (int64_t c = 0; c < DC; ++c) {
        __m512i block[16];
        for (int64_t s = 0; s < 16; ++s)
          block[s] = s < n ? _mm512_loadu_si512(k32 + (s0 + s) * (D / 2) + c * 16) : _mm512_setzero_si512();
        transpose16x16(block);
        uint32_t* dst = ktbuf + (s0 / 16 * DC + c) * 256;
        for (int64_t p = 0; p < 16; ++p) _mm512_storeu_si512(dst + p * 16, block[p]);
      }
    }
    // V with pairs of keys interleaved (B tiles of P V): vbuf[p][d][2] = V[2p][d], V[2p+1][d]
    const uint16_t* vh = V + h * vh_stride;
    for (int64_t p = 0; p < L32 / 2; ++p) {
      for (int64_t d = 0; d < D; d += 32) {
        const __m512i a = 2 * p < L ? _mm512_loadu_si512(vh + 2 * p * D + d) : _mm512_setzero_si512();
        const __m512i b = 2 * p + 1 < L ? _mm512_loadu_si512(vh + (2 * p + 1) * D + d) : _mm512_setzero_si512();
        _mm512_storeu_si512(vbuf + p * 2 * D + 2 * d, _mm512_permutex2var_epi16(a, lo, b));
        _mm512_storeu_si512(vbuf + p * 2 * D + 2 * d + 32, _mm512_permutex2var_epi16(a, hi, b));
      }
    }
  }
  // blocks of queries of every K/V head: independent work items (each thread its own tiles and buffers)
  const int64_t blocks = (rows + qb - 1) / qb;
  #pragma omp parallel num_threads((int)threads) if (threads > 1 && kv_heads * blocks > 1)
  {
    std::unique_ptr<uint16_t[]> qbuf(new uint16_t[48 * D]);
    std::unique_ptr<float[]> S(new float[48 * L16]);
    std::unique_ptr<uint16_t[]> P(new uint16_t[48 * L32]);
    alignas(64) float obuf[48 * 128];
    float sums[48];
    configure_all();
    #pragma omp for schedule(dynamic)
    for (int64_t item = 0; item < kv_heads * blocks; ++item) {
      const int64_t h = item / blocks, i0 = item % blocks * qb;
      const uint32_t* ktbuf = kt_all.get() + h * kt_size;
      const uint16_t* vbuf = v_all.get() + h * v_size;
      const int64_t nq = (rows - i0) < qb ? (rows - i0) : qb;
      const int64_t R = groups * nq, RB = (R + 15) / 16;
      int64_t keys = has_mask ? L : past + i0 + nq;  // the keys any query of the block sees
      if (keys > L) keys = L;
      const int64_t K16 = (keys + 15) / 16 * 16, K32 = (keys + 31) / 32 * 32;
      // Q rows of this block, zero-padded to whole tiles: row g * nq + i is query i0 + i of head g
      std::memset(qbuf.get(), 0, sizeof(uint16_t) * RB * 16 * D);
      for (int64_t g = 0; g < groups; ++g)
        for (int64_t i = 0; i < nq; ++i)
          std::memcpy(qbuf.get() + (g * nq + i) * D, Q + (h * groups + g) * qh + (i0 + i) * qi, sizeof(uint16_t) * D);
      // S = Q K^T
      for (int64_t s0 = 0; s0 < K16; s0 += 16) {
        _tile_zero(0);
        if (RB > 1) _tile_zero(1);
        if (RB > 2) _tile_zero(2);
        const uint32_t* kt = ktbuf + s0 / 16 * DC * 256;
        for (int64_t c = 0; c < DC; ++c) {
          _tile_loadd(4, kt + c * 256, 64);
          _tile_loadd(3, qbuf.get() + c * 32, D * 2);
          _tile_dpbf16ps(0, 3, 4);
          if (RB > 1) { _tile_loadd(3, qbuf.get() + 16 * D + c * 32, D * 2); _tile_dpbf16ps(1, 3, 4); }
          if (RB > 2) { _tile_loadd(3, qbuf.get() + 32 * D + c * 32, D * 2); _tile_dpbf16ps(2, 3, 4); }
        }
        _tile_stored(0, S.get() + s0, L16 * 4);
        if (RB > 1) _tile_stored(1, S.get() + 16 * L16 + s0, L16 * 4);
        if (RB > 2) _tile_stored(2, S.get() + 32 * L16 + s0, L16 * 4);
      }
      // softmax rows: scaled scores plus the mask (or the causal limit), exp against the row max
      // (unnormalised, rounded to bf16 as P), the fp32 row sums
      std::memset(P.get() + R * L32, 0, sizeof(uint16_t) * (RB * 16 - R) * L32);  // padded rows
      for (int64_t r = 0; r < R; ++r) {
        const int64_t i = i0 + r % nq;
        int64_t lim = has_mask ? keys : past + i + 1;  // keys [0, lim) may be visible
        if (lim > keys) lim = keys;
        const uint16_t* m = has_mask ? mask + i * mi : nullptr;
        float* srow = S.get() + r * L16;
        uint16_t* prow = P.get() + r * L32;
        std::memset(prow + (lim & ~int64_t(15)), 0, sizeof(uint16_t) * (K32 - (lim & ~int64_t(15))));
        // pass 1: the row max of scale * s + mask (scale > 0: without a mask, of s alone)
        const int64_t full = lim & ~int64_t(15);
        const __mmask16 tail = (__mmask16)((1u << (lim - full)) - 1u);
        const __m512 vscale = _mm512_set1_ps(scale);
        __m512 vmax = _mm512_set1_ps(-INFINITY);
        if (m) {
          for (int64_t s = 0; s < full; s += 16)
            vmax = _mm512_max_ps(vmax, _mm512_fmadd_ps(_mm512_loadu_ps(srow + s), vscale,
                                                       bf16x16_to_f32(_mm256_loadu_si256((const __m256i*)(m + s)))));
          if (tail) {
            const __m512 v = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, srow + full), vscale,
                                             bf16x16_to_f32(_mm256_maskz_loadu_epi16(tail, m + full)));
            vmax = _mm512_mask_max_ps(vmax, tail, vmax, v);
          }
        } else {
          for (int64_t s = 0; s < full; s += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(srow + s));
          if (tail) vmax = _mm512_mask_max_ps(vmax, tail, vmax, _mm512_maskz_loadu_ps(tail, srow + full));
          vmax = _mm512_mul_ps(vmax, vscale);
        }
        const float mx = _mm512_reduce_max_ps(vmax);
        // pass 2: weights exp(scale * s + mask - max), rounded to bf16 as P; fp32 sums
        __m512 vsum = _mm512_setzero_ps();
        if (mx == -INFINITY) {
          std::memset(prow, 0, sizeof(uint16_t) * K32);  // nothing visible: zero weights, zero output
        } else {
          const __m512 vm = _mm512_set1_ps(mx);
          for (int64_t s = 0; s < lim; s += 16) {
            const __mmask16 live = s < full ? (__mmask16)0xFFFF : tail;
            __m512 v = _mm512_fmsub_ps(_mm512_maskz_loadu_ps(live, srow + s), vscale, vm);
            if (m) v = _mm512_add_ps(v, bf16x16_to_f32(_mm256_maskz_loadu_epi16(live, m + s)));
            const __m512 e = _mm512_maskz_mov_ps(live, exp_nonpositive(v));
            _mm256_mask_storeu_epi16(prow + s, live, (__m256i)_mm512_cvtneps_pbh(e));
            vsum = _mm512_add_ps(vsum, e);
          }
        }
        sums[r] = _mm512_reduce_add_ps(vsum);
      }
      // O = P V, 32 output dims at a time: C tile 2 * j + jj is row block j, dims d0 + 16 jj
      for (int64_t d0 = 0; d0 < D; d0 += 32) {
        _tile_zero(0); _tile_zero(1);
        if (RB > 1) { _tile_zero(2); _tile_zero(3); }
        if (RB > 2) { _tile_zero(4); _tile_zero(5); }
        for (int64_t s0 = 0; s0 < K32; s0 += 32) {
          _tile_loadd(7, vbuf + (s0 / 2) * 2 * D + 2 * d0, D * 4);
          _tile_loadd(6, P.get() + s0, L32 * 2);
          _tile_dpbf16ps(0, 6, 7);
          if (RB > 1) { _tile_loadd(6, P.get() + 16 * L32 + s0, L32 * 2); _tile_dpbf16ps(2, 6, 7); }
          if (RB > 2) { _tile_loadd(6, P.get() + 32 * L32 + s0, L32 * 2); _tile_dpbf16ps(4, 6, 7); }
          _tile_loadd(7, vbuf + (s0 / 2) * 2 * D + 2 * (d0 + 16), D * 4);
          _tile_loadd(6, P.get() + s0, L32 * 2);
          _tile_dpbf16ps(1, 6, 7);
          if (RB > 1) { _tile_loadd(6, P.get() + 16 * L32 + s0, L32 * 2); _tile_dpbf16ps(3, 6, 7); }
          if (RB > 2) { _tile_loadd(6, P.get() + 32 * L32 + s0, L32 * 2); _tile_dpbf16ps(5, 6, 7); }
        }
        _tile_stored(0, obuf + d0, D * 4);
        _tile_stored(1, obuf + d0 + 16, D * 4);
        if (RB > 1) { _tile_stored(2, obuf + 16 * D + d0, D * 4); _tile_stored(3, obuf + 16 * D + d0 + 16, D * 4); }
        if (RB > 2) { _tile_stored(4, obuf + 32 * D + d0, D * 4); _tile_stored(5, obuf + 32 * D + d0 + 16, D * 4); }
      }
      for (int64_t r = 0; r < R; ++r) {
        const int64_t g = r / nq, i = i0 + r % nq;
        const __m512 inv = _mm512_set1_ps(sums[r] > 0.f ? 1.0f / sums[r] : 0.f);
        uint16_t* o = out + i * oi + (h * groups + g) * D;
        for (int64_t d = 0; d < D; d += 16)
          _mm256_storeu_si256((__m256i*)(o + d),
                              (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(obuf + r * D + d), inv)));
      }
    }
    _tile_release();
  }
}
"""

_ARGTYPES = ("const uint16_t*",) * 4 + ("uint16_t*",) + ("int64_t",) * 14 + ("float",)


def unavailable(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                mask: Optional[torch.Tensor]) -> str | None:
    """``None`` when :func:`attention` takes these and runs here (AMX, a compiler), else why not."""
    return unsupported(query, key, value, mask) or _build()[1]


def unsupported(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                mask: Optional[torch.Tensor]) -> str | None:
    """``None`` when :func:`attention` takes these (transformers' layouts: ``query`` ``[b, heads, q, d]``,
    ``key``/``value`` ``[b, kv_heads, k, d]``, a 4-D additive mask), else why not. Shapes only, so
    that compiled graphs can ask it while tracing."""
    b, heads, rows, dim = query.shape
    kv_heads = key.shape[1]
    if query.device.type != "cpu" or not (query.dtype == key.dtype == value.dtype == torch.bfloat16):
        return "the AMX attention takes bf16 CPU tensors"
    if b != 1:
        return "the AMX attention takes one sequence"
    if mask is None:
        if key.shape[2] != rows:
            return "without a mask the AMX attention is causal over as many keys as queries"
    elif mask.dim() != 4 or mask.shape[0] != 1 or mask.shape[1] != 1:
        return "the AMX attention takes a 4-D mask shared by the heads"
    elif mask.dtype != torch.bfloat16 or mask.shape[2] != rows or mask.shape[3] > key.shape[2]:
        return "the AMX attention takes an additive bf16 mask of the queries' rows, at most as wide as the keys"
    if rows < 1:
        return "the AMX attention takes at least one query"
    if heads % kv_heads or heads // kv_heads > MAX_ROWS:
        return f"more than {MAX_ROWS} query heads per K/V head"
    if dim % 32 or dim > MAX_HEAD_DIM:
        return f"head dim {dim} is not a multiple of 32 up to {MAX_HEAD_DIM}"
    if query.stride(-1) != 1 or key.stride(-1) != 1 or value.stride(-1) != 1 or key.stride(2) != dim \
            or value.stride(2) != dim:
        return "the AMX attention reads whole rows of keys and values (contiguous head dims)"
    return None


#: Kernel calls in this process (not an aten op: the profiler does not count it); for tests.
calls = 0


@functools.lru_cache(maxsize=None)
def _build() -> tuple[object | None, str | None]:  # once per process, without hashing the source per call
    return amx.build(SOURCE, _ARGTYPES)


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Optional[torch.Tensor],
              scale: float) -> torch.Tensor:
    """softmax(Q K^T * scale + mask) V over the mask's width of keys (no mask: causal over as many keys
    as queries), ``[b, q, heads, d]`` as transformers' attention functions return; inputs as
    :func:`unsupported` accepts them."""
    global calls
    calls += 1
    _, heads, rows, dim = query.shape
    kv_heads = key.shape[1]
    if mask is None:  # causal, as many keys as queries
        keys, m = key.shape[2], query
    else:
        keys, m = mask.shape[3], mask[0, 0]
        if m.stride(-1) != 1:
            m = m.contiguous()
    out = query.new_empty((1, rows, heads, dim))
    if keys:
        _build()[0](
            query, key, value, m, out, kv_heads, heads // kv_heads, rows, keys, dim, query.stride(1),
            query.stride(2), key.stride(1), value.stride(1), m.stride(0) if mask is not None else 0, out.stride(1),
            mask is not None, keys - rows, torch.get_num_threads(), float(scale))
    else:
        out.zero_()
    return out
