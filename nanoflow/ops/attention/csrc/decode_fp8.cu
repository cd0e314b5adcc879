// Paged decode attention over a float8 (e4m3) KV cache, hand-scheduled with mma.sync, for head_dim 128.
//
// Why a CUDA kernel beside the Triton ones: overlapping decode attention with GEMMs needs attention to reach most of
// the HBM bandwidth on a small share of the SMs. The Triton float8 kernel issues ~0.16 warp instructions per K/V
// element (Nsight Compute, s9-ncu-decode-h100.json), which caps it at ~27 G elements/s per SM. This kernel reads
// each lane's fragments as whole 16-byte words and needs ~0.07 (by its SASS), and keeps three tiles in flight per
// warp: 2.5x the Triton kernel's bytes per SM on an H100 (s10-green-decode-cuda-ring-h100.json).
//
// Work: one warp owns one (row, kv head, split) item and walks its KV tiles of 16 tokens (one page of 16, or a
// 16-token slice of a larger page). Lane (g, t) = (lane / 4, lane % 4), the mma.sync m16n8k16 fragment coordinates.
//
// * Scores, transposed: S^T = K Q^T (mma: A = K, 16 keys x 16 head dims; B = Q^T, 16 head dims x 8 query heads, of
//   which the group's are the first GROUP, the rest zero). The contraction runs over head dims in any order, so the
//   dims are permuted to make each lane's A fragments whole loaded words: lane (g, t) loads keys g and g + 8, bytes
//   [64 h + 16 t, +16) for h = 0, 1, and chunk c = 4 h + w of the contraction takes word w of load h: its two low
//   bytes as (k = 2t, 2t+1), its two high bytes as (k = 2t+8, 2t+9). Q's fragments use the same map.
// * The online softmax runs on S^T's accumulators: lane (g, t) holds keys g, g + 8 of heads 2t, 2t + 1, the same
//   heads whose output accumulators it holds, so the running max and rescale need no shuffles.
// * O^T = V^T P^T (mma: A = V^T, 16 head dims x 16 keys; B = P^T, 16 keys x 8 heads). P's B fragments are P^T's
//   accumulators transposed in registers (movmatrix, two per tile). V^T's rows (head dims) are permuted too: lane
//   (g, t) loads keys 2t, 2t+1, 8+2t, 9+2t, bytes [16 g, +16), and rows g / g + 8 of m-tile i are dims 16 g + 2 i /
//   16 g + 2 i + 1. One byte permute pairs two keys' bytes of the same dims, one conversion widens each pair to
//   float16. The accumulators then hold, per lane, 16 contiguous dims of heads 2t and 2t + 1.
// * Log2 units with a lazy rescale: the running max moves only when a tile's max exceeds it by more than 8
//   (probabilities stay <= 256, exact enough in float16 and float32 sums), so the 32 accumulators are rarely
//   rescaled; the final division uses the same max, so the result is the same softmax.
// * K/V tiles are copied by cp.async into a per-warp ring of STAGES shared-memory tiles (swizzled, see swz), issued
//   STAGES - 1 tiles ahead; page ids are loaded 32 at a time, one per lane, and handed out by shuffles. (With only
//   the next tile prefetched into registers, bytes in flight per SM were the limit: s10-green-decode-cuda-h100.json.)
// * The K/V copies may carry an L2 cache policy (Params::l2_hint); measured, it does not change how much a GEMM
//   running beside the kernel slows (s10-green-decode-cuda-l2hint-h100.json).
//
// With one split the warp writes the normalised output (bfloat16); with several it writes a normalised partial
// output and its log2-sum-exp2 to the workspace, combined by the Triton reduce kernel (split_kv.py), which uses the
// same tile arithmetic (tiles of 16 tokens, cdiv(tiles, splits) per split).
//
// Built by nanoflow/ops/attention/decode_cuda.py with nvcc for sm_89+ (cvt.e4m3x2 needs it).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

// The launch parameters (mirrored by ctypes in decode_cuda.py); outside the anonymous namespace so the exported
// launcher taking it keeps external linkage.
struct Params {
  const __nv_bfloat16* q;
  const uint8_t* k;
  const uint8_t* v;
  const int* block_tables;
  const int* seq_lens;
  __nv_bfloat16* out;
  float* po;
  float* plse;
  int rows, kv_heads, group, num_splits, page_shift;
  int l2_hint;  // K/V copies: 0 plain, 1 L2 evict_first (the streamed cache leaves L2 before a GEMM's tiles), 2 evict_last
  float scale_log2;
  long long q_row, q_head;
  long long k_page, k_slot, k_head;
  long long v_page, v_slot, v_head;
  long long bt_row;
  long long o_row, o_head;
  long long po_row, po_head, po_split, plse_row, plse_head;
};

namespace {

constexpr int TILE = 16;
constexpr int WARPS = 4;
constexpr float RESCALE_SLACK = 8.0f;  // log2 units: probabilities stay <= 2^8 between rescales


struct Tile {
  uint4 k[2][2];  // [key g | key g + 8][half h]: bytes [64 h + 16 t, +16) of the key's row
  uint4 v[4];     // key (a / 2) * 8 + 2 t + a % 2, bytes [16 g, +16)
};

// Two e4m3 values (the low or high 16 bits of w) widened to a float16 pair; the half is selected inside the
// conversion (F2FP ... .H1), not by a separate shift.
__device__ __forceinline__ uint32_t e4m3x2_lo(uint32_t w) {
  uint32_t r;
  asm("{\n .reg .b16 lo, hi;\n mov.b32 {lo, hi}, %1;\n cvt.rn.f16x2.e4m3x2 %0, lo;\n}" : "=r"(r) : "r"(w));
  return r;
}

__device__ __forceinline__ uint32_t e4m3x2_hi(uint32_t w) {
  uint32_t r;
  asm("{\n .reg .b16 lo, hi;\n mov.b32 {lo, hi}, %1;\n cvt.rn.f16x2.e4m3x2 %0, hi;\n}" : "=r"(r) : "r"(w));
  return r;
}

__device__ __forceinline__ float fast_exp2(float x) {  // -inf -> +0
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}

__device__ __forceinline__ uint32_t pack_f16x2(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// The transpose of an 8x8 matrix of 16-bit values held in mma fragment layout (lane (g, t): row g, cols 2t, 2t+1).
__device__ __forceinline__ uint32_t transpose8x8(uint32_t x) {
  uint32_t r;
  asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(r) : "r"(x));
  return r;
}

__device__ __forceinline__ void mma_f16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                        uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t word(const uint4& x, int w) {
  return w == 0 ? x.x : w == 1 ? x.y : w == 2 ? x.z : x.w;
}

constexpr int TILE_BYTES = 2 * TILE * 128;  // one tile of one kv head in shared memory: K rows, then V rows

// Shared-memory swizzle: the 16-byte chunk j of tile row r lives at chunk j ^ swz(r) of that row. With it the K reads
// (lanes (g, t): row g, chunk 4h + t), the V reads (row 2t + c, chunk g) and the copies (8 lanes per row) each touch
// 8 distinct chunk positions per quarter warp: no bank conflicts. swz(r + 8) == swz(r).
__device__ __forceinline__ int swz(int r) { return ((((r >> 1) & 3) << 1) ^ ((r & 1) << 2)); }

__device__ __forceinline__ void cp_async16(uint32_t dst, const uint8_t* src, int hint, uint64_t policy) {
  if (hint)
    asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "l"(policy)
                 : "memory");
  else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ uint64_t l2_policy(int hint) {
  uint64_t policy = 0;
  if (hint == 1) asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  if (hint == 2) asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(policy));
  return policy;
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

__device__ __forceinline__ uint4 lds16(uint32_t addr) {
  uint4 r;
  asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "r"(addr));
  return r;
}

// Per-lane offsets, fixed for the whole kernel.
struct LaneOffsets {
  int src_k[4], src_v[4];  // copy i: row (lane / 8) + 4 i, chunk lane % 8 of the page slice (global bytes)
  uint32_t dst[4];         // ... and where it lands in a stage (K; V is TILE_BYTES / 2 further)
  uint32_t rd_k[2];        // read: K row g, chunk 4 h + t (row g + 8 is 1024 bytes further)
  uint32_t rd_v[2];        // read: V row 2t + a, chunk g (rows 8 + 2t + a are 1024 bytes further)
  int hint;                // Params::l2_hint, and its cache policy
  uint64_t policy;
};

// Issue one tile's copies (8 per lane) from the page slice at k / v into the stage at smem address `stage`.
__device__ __forceinline__ void copy_tile(uint32_t stage, const uint8_t* k, const uint8_t* v, const LaneOffsets& off) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    cp_async16(stage + off.dst[i], k + off.src_k[i], off.hint, off.policy);
    cp_async16(stage + TILE_BYTES / 2 + off.dst[i], v + off.src_v[i], off.hint, off.policy);
  }
}

__device__ __forceinline__ void read_tile(Tile& tl, uint32_t stage, const LaneOffsets& off) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    tl.k[0][h] = lds16(stage + off.rd_k[h]);
    tl.k[1][h] = lds16(stage + off.rd_k[h] + 1024);
  }
#pragma unroll
  for (int a = 0; a < 2; ++a) {
    tl.v[a] = lds16(stage + TILE_BYTES / 2 + off.rd_v[a]);
    tl.v[a + 2] = lds16(stage + TILE_BYTES / 2 + off.rd_v[a] + 1024);
  }
}

struct State {
  uint32_t qa[8], qb[8];  // Q^T fragments of head g per contraction chunk (zero for g >= group)
  float o[8][4];          // O^T accumulators: m-tile i, (dim 16g+2i | 16g+2i+1) x (head 2t | 2t+1)
  float m[2], l[2];       // running max (log2 units) and this lane's partial sum, heads 2t and 2t+1
};

// One tile: scores S^T = K Q^T, online softmax, then O^T += V^T P^T. valid: tokens of the tile below the row's end,
// read only when PARTIAL (the row's last tile), so full tiles carry no masking instructions.
template <bool PARTIAL>
__device__ __forceinline__ void attend_tile(State& st, Tile& tl, int valid, float scale_log2, int g, int t) {
  float sa[4] = {}, sb[4] = {};  // two accumulation chains (even / odd chunks) shorten the dependent mma chain
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    const uint32_t w0 = word(tl.k[0][c >> 2], c & 3), w8 = word(tl.k[1][c >> 2], c & 3);
    if (c & 1)
      mma_f16(sb, e4m3x2_lo(w0), e4m3x2_lo(w8), e4m3x2_hi(w0), e4m3x2_hi(w8), st.qa[c], st.qb[c]);
    else
      mma_f16(sa, e4m3x2_lo(w0), e4m3x2_lo(w8), e4m3x2_hi(w0), e4m3x2_hi(w8), st.qa[c], st.qb[c]);
  }
  // x[r]: (key g | g + 8) x (head 2t | 2t + 1), r = 2 * (key half) + head
  float x[4];
#pragma unroll
  for (int r = 0; r < 4; ++r) x[r] = (sa[r] + sb[r]) * scale_log2;
  if (PARTIAL) {
    if (g >= valid) x[0] = x[1] = -INFINITY;
    if (g + 8 >= valid) x[2] = x[3] = -INFINITY;
  }
  float mx[2] = {fmaxf(x[0], x[2]), fmaxf(x[1], x[3])};
#pragma unroll
  for (int e = 0; e < 2; ++e)
#pragma unroll
    for (int s = 4; s < 32; s <<= 1) mx[e] = fmaxf(mx[e], __shfl_xor_sync(0xffffffffu, mx[e], s));
  if (__any_sync(0xffffffffu, mx[0] > st.m[0] + RESCALE_SLACK || mx[1] > st.m[1] + RESCALE_SLACK)) {
    float alpha[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const float m_new = fmaxf(st.m[e], mx[e]);
      alpha[e] = fast_exp2(st.m[e] - m_new);  // 0 on the first tile (m = -inf)
      st.l[e] *= alpha[e];
      st.m[e] = m_new;
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      st.o[i][0] *= alpha[0];
      st.o[i][1] *= alpha[1];
      st.o[i][2] *= alpha[0];
      st.o[i][3] *= alpha[1];
    }
  }
  float pr[4];
#pragma unroll
  for (int r = 0; r < 4; ++r) pr[r] = fast_exp2(x[r] - st.m[r & 1]);
  st.l[0] += pr[0] + pr[2];
  st.l[1] += pr[1] + pr[3];
  // P^T (keys x heads) in accumulator layout -> P (heads x keys): the B fragments of O^T = V^T P^T.
  const uint32_t pb0 = transpose8x8(pack_f16x2(pr[0], pr[1])), pb1 = transpose8x8(pack_f16x2(pr[2], pr[3]));
  if (PARTIAL) {  // tokens past the row's end: their V bytes may be anything (NaN bit patterns included)
#pragma unroll
    for (int a = 0; a < 4; ++a)
      if ((a >> 1) * 8 + 2 * t + (a & 1) >= valid) tl.v[a] = make_uint4(0, 0, 0, 0);
  }
#pragma unroll
  for (int w = 0; w < 4; ++w) {
#pragma unroll
    for (int sub = 0; sub < 2; ++sub) {
      // bytes (2 sub, 2 sub + 1) of word w are dims 16g + 2i, 16g + 2i + 1 with i = 2w + sub; pair keys 2t, 2t+1
      // (and 8+2t, 9+2t) byte by byte: low half -> row g, high half -> row g + 8 of m-tile i
      const uint32_t sel = sub ? 0x7362u : 0x5140u;
      const uint32_t lo = __byte_perm(word(tl.v[0], w), word(tl.v[1], w), sel);
      const uint32_t hi = __byte_perm(word(tl.v[2], w), word(tl.v[3], w), sel);
      mma_f16(st.o[2 * w + sub], e4m3x2_lo(lo), e4m3x2_hi(lo), e4m3x2_lo(hi), e4m3x2_hi(hi), pb0, pb1);
    }
  }
}

template <int STAGES>
__global__ void __launch_bounds__(WARPS * 32) decode_fp8_kernel(const Params p) {
  extern __shared__ __align__(128) uint8_t smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int items = p.rows * p.kv_heads * p.num_splits;
  const uint32_t ring = (uint32_t)__cvta_generic_to_shared(smem) + warp * STAGES * TILE_BYTES;  // this warp's stages
  LaneOffsets off;
  off.hint = p.l2_hint;
  off.policy = l2_policy(p.l2_hint);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = (lane >> 3) + 4 * i, j = lane & 7;
    off.src_k[i] = r * (int)p.k_slot + 16 * j;
    off.src_v[i] = r * (int)p.v_slot + 16 * j;
    off.dst[i] = r * 128 + 16 * (j ^ swz(r));
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) off.rd_k[h] = g * 128 + 16 * ((4 * h + t) ^ swz(g));
#pragma unroll
  for (int a = 0; a < 2; ++a) off.rd_v[a] = (2 * t + a) * 128 + 16 * (g ^ swz(2 * t + a));
  const int tile_shift = p.page_shift - 4;  // log2(tiles per page)
  const int tile_mask = (1 << tile_shift) - 1;

  for (int item = blockIdx.x * WARPS + warp; item < items; item += gridDim.x * WARPS) {
    const int split = item % p.num_splits, kvh = (item / p.num_splits) % p.kv_heads;
    const int row = item / (p.num_splits * p.kv_heads);
    const int seq_len = p.seq_lens[row];
    if (seq_len <= 0) continue;
    const int num_tiles = (seq_len + TILE - 1) / TILE, per_split = (num_tiles + p.num_splits - 1) / p.num_splits;
    const int lo = split * per_split, hi = min(lo + per_split, num_tiles);
    if (lo >= hi) continue;

    State st;
    st.m[0] = st.m[1] = -INFINITY;
    st.l[0] = st.l[1] = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) st.o[i][0] = st.o[i][1] = st.o[i][2] = st.o[i][3] = 0.f;
    {  // Q: head kvh * group + g, dims [64 h + 16 t, +16), as float16 pairs in the permuted contraction order
      const bool real = g < p.group;
      const __nv_bfloat16* qrow = p.q + row * p.q_row + (long long)(kvh * p.group + (real ? g : 0)) * p.q_head;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        uint4 raw[2];
        raw[0] = real ? *reinterpret_cast<const uint4*>(qrow + 64 * h + 16 * t) : make_uint4(0, 0, 0, 0);
        raw[1] = real ? *reinterpret_cast<const uint4*>(qrow + 64 * h + 16 * t + 8) : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int w = 0; w < 4; ++w) {  // dims 4w .. 4w+3 of the 16: bytes (0, 1) -> qa, (2, 3) -> qb of K's word
          const uint32_t lo = word(raw[w >> 1], (w & 1) * 2), hi = word(raw[w >> 1], (w & 1) * 2 + 1);
          const float2 flo = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&lo));
          const float2 fhi = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&hi));
          st.qa[4 * h + w] = pack_f16x2(flo.x, flo.y);
          st.qb[4 * h + w] = pack_f16x2(fhi.x, fhi.y);
        }
      }
    }

    const int* bt = p.block_tables + row * p.bt_row;
    const uint8_t* kb = p.k + kvh * p.k_head;
    const uint8_t* vb = p.v + kvh * p.v_head;
    // Page ids, 32 at a time (one per lane), handed out by shuffles: no dependent global load per tile.
    const int last_page = (hi - 1) >> tile_shift;
    int page_base = lo >> tile_shift;
    int pages = bt[min(page_base + lane, last_page)];
    auto tile_ptrs = [&](int tile, const uint8_t*& k, const uint8_t*& v) {
      int idx = (tile >> tile_shift) - page_base;
      if (idx >= 32) {  // warp-uniform: every lane walks the same tiles
        page_base += 32;
        idx -= 32;
        pages = bt[min(page_base + lane, last_page)];
      }
      // 32-bit offsets: the launcher checks that one layer's pages span < 4 GiB
      const uint32_t page_id = __shfl_sync(0xffffffffu, pages, idx), slot0 = (tile & tile_mask) * TILE;
      k = kb + (page_id * (uint32_t)p.k_page + slot0 * (uint32_t)p.k_slot);
      v = vb + (page_id * (uint32_t)p.v_page + slot0 * (uint32_t)p.v_slot);
    };

    // A ring of STAGES tiles per warp: tile i's copies are issued STAGES - 1 tiles ahead (one commit group per
    // tile, empty past the end, so wait_group<STAGES - 2> always means "tile i has landed").
    const int partial = (hi * TILE <= seq_len) ? -1 : hi - 1;  // only the row's last tile can be partial
    const uint8_t *kt, *vt;
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (lo + s < hi) {
        tile_ptrs(lo + s, kt, vt);
        copy_tile(ring + s * TILE_BYTES, kt, vt, off);
      }
      cp_async_commit();
    }
    int slot = 0;
    auto next_tile = [&](int tile, Tile& tl) {  // wait for `tile`, read it, issue the copies STAGES - 1 ahead
      cp_async_wait<STAGES - 2>();
      __syncwarp();  // every lane's copies of this tile have landed; every lane has read the previous stage
      read_tile(tl, ring + slot * TILE_BYTES, off);
      const int ahead = tile + STAGES - 1;
      if (ahead < hi) {
        tile_ptrs(ahead, kt, vt);
        copy_tile(ring + (slot == 0 ? STAGES - 1 : slot - 1) * TILE_BYTES, kt, vt, off);
      }
      cp_async_commit();
      slot = slot == STAGES - 1 ? 0 : slot + 1;
    };
    const int full_hi = partial < 0 ? hi : hi - 1;
    for (int tile = lo; tile < full_hi; ++tile) {
      Tile tl;
      next_tile(tile, tl);
      attend_tile<false>(st, tl, TILE, p.scale_log2, g, t);
    }
    if (partial >= 0) {
      Tile tl;
      next_tile(partial, tl);
      attend_tile<true>(st, tl, seq_len - partial * TILE, p.scale_log2, g, t);
    }
    cp_async_wait<0>();  // nothing may still land in the ring when the next item reuses it
    __syncwarp();

    // Lane (g, t) holds dims 16g .. 16g+15 of heads 2t, 2t+1; their sums are spread over the 8 lanes of each t.
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float l = st.l[e];
#pragma unroll
      for (int s = 4; s < 32; s <<= 1) l += __shfl_xor_sync(0xffffffffu, l, s);
      const int head_in_group = 2 * t + e;
      if (head_in_group >= p.group) continue;
      const int head = kvh * p.group + head_in_group;
      const float inv = 1.f / l;
      if (p.num_splits == 1) {
        uint32_t packed[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          __nv_bfloat162 b = __floats2bfloat162_rn(st.o[i][e] * inv, st.o[i][2 + e] * inv);
          packed[i] = *reinterpret_cast<uint32_t*>(&b);
        }
        uint4* dst = reinterpret_cast<uint4*>(p.out + row * p.o_row + head * p.o_head + 16 * g);
        dst[0] = make_uint4(packed[0], packed[1], packed[2], packed[3]);
        dst[1] = make_uint4(packed[4], packed[5], packed[6], packed[7]);
      } else {
        float4* dst = reinterpret_cast<float4*>(p.po + row * p.po_row + head * p.po_head + split * p.po_split + 16 * g);
#pragma unroll
        for (int i = 0; i < 4; ++i)
          dst[i] = make_float4(st.o[2 * i][e] * inv, st.o[2 * i][2 + e] * inv, st.o[2 * i + 1][e] * inv,
                               st.o[2 * i + 1][2 + e] * inv);
        if (g == 0) p.plse[row * p.plse_row + head * p.plse_head + split] = st.m[e] + log2f(l);
      }
    }
  }
}

}  // namespace

template <int STAGES>
static int launch(const Params& p, int blocks, cudaStream_t stream) {
  constexpr int smem = WARPS * STAGES * TILE_BYTES;
  static bool configured = false;  // the opt-in above 48 KiB of dynamic shared memory, once per instantiation
  if (!configured) {
    const cudaError_t err = cudaFuncSetAttribute(decode_fp8_kernel<STAGES>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return (int)err;
    configured = true;
  }
  decode_fp8_kernel<STAGES><<<blocks, WARPS * 32, smem, stream>>>(p);
  return (int)cudaGetLastError();
}

extern "C" {

// Launches the kernel on `stream`; returns a cudaError_t (0 on success), or -1 for an unsupported stage count.
// stages: tiles in flight per warp's shared-memory ring (2, 3, 4, 6 or 8). max_blocks > 0 bounds the grid (blocks
// of WARPS work-item warps; the warps then loop over the items), the grid-size knob of an overlapped pipeline.
int nf_decode_fp8(Params p, int stages, int max_blocks, cudaStream_t stream) {
  const long long items = (long long)p.rows * p.kv_heads * p.num_splits;
  if (items == 0) return 0;
  long long blocks = (items + WARPS - 1) / WARPS;
  if (max_blocks > 0 && max_blocks < blocks) blocks = max_blocks;
  switch (stages) {
    case 2: return launch<2>(p, (int)blocks, stream);
    case 3: return launch<3>(p, (int)blocks, stream);
    case 4: return launch<4>(p, (int)blocks, stream);
    case 6: return launch<6>(p, (int)blocks, stream);
    case 8: return launch<8>(p, (int)blocks, stream);
    default: return -1;
  }
}

int nf_params_size() { return (int)sizeof(Params); }
}
