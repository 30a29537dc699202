// rbee: llama.cpp's CPU flash attention for small batches (README.md here).
//
// Upstream (ggml-cpu/ops.cpp) takes batches of 64 query tokens or more through a
// tiled kernel (scores and values as small GEMMs) and everything smaller through
// a per-row loop: one K dot product, one expf and one f16 multiply-add per
// cached token and query row. A chat's next turn is a batch of ~20 tokens over
// ~1,500 cached ones, where that loop spends half the turn. This kernel takes
// batches of 2 to 63 tokens through the same tile scheme, with two changes that
// matter at that size: the GEMMs are as tall as the rows there are (upstream
// pads every tile to 64 rows), and the query heads that share a KV head share a
// tile (grouped-query attention: the K and V tiles are converted once for the
// whole group, not once per query head). Where those tiles are fewer than the
// threads (one or two KV heads, a short batch), the cached tokens are split
// among threads as well and the parts' softmax states merged. Everything else
// (one-token decode, large batches, ALiBi, soft-capping, attention sinks,
// quantized and BF16 caches) goes to upstream's kernel, renamed by rbee.cmake.

#include "ops.h"

#include "common.h"
#include "ggml-cpu-impl.h"
#include "simd-gemm.h"
#include "vec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <atomic>

extern "C" void ggml_compute_forward_flash_attn_ext_upstream(
        const struct ggml_compute_params * params, struct ggml_tensor * dst);

// How many attention ops this kernel has computed for graphs this thread ran
// (ggml's thread 0 is the caller's): rbee's tests read it to know the hook is
// in the binary and which shapes come here.
extern "C" uint64_t rbee_flash_attn_small_calls(void);

// How many of those split the cached tokens among threads (fewer tiles than threads).
extern "C" uint64_t rbee_flash_attn_small_split_calls(void);

// Whether this kernel takes the shapes it can (on unless rbee turns it off:
// RBEE_ATTN_KERNEL=upstream); off, every op goes to upstream's kernel.
extern "C" void rbee_flash_attn_small_enable(bool on);

namespace {

std::atomic<bool> enabled{true};

constexpr int64_t ROWS = ggml_fa_tile_config::Q;  // query rows per tile (the scratch upstream plans for)
constexpr int64_t KV   = ggml_fa_tile_config::KV; // cached tokens per tile

// How many cached tokens the batch's last query row can see (its mask's last
// visible column, + 1), the largest over the streams.
int64_t span(const ggml_tensor * q, const ggml_tensor * k, const ggml_tensor * mask) {
    if (mask == nullptr) {
        return k->ne[1];
    }
    int64_t seen = 0;
    for (int64_t i3 = 0; i3 < mask->ne[3]; i3++) {
        const ggml_fp16_t * row = (const ggml_fp16_t *) ((const char *) mask->data
                                  + (q->ne[1] - 1)*mask->nb[1] + i3*mask->nb[3]);
        for (int64_t ic = k->ne[1]; ic > seen; ic--) {
            if (GGML_CPU_FP16_TO_FP32(row[ic - 1]) != -INFINITY) {
                seen = ic;
                break;
            }
        }
    }
    return seen;
}

// Floats of per-thread scratch a tile uses (laid out as upstream's tiled kernel
// plans it in ggml-cpu.c: Q, KQ, mask, VKQ, V, K, and a cache line).
int64_t scratch_per_thread(int64_t DK, int64_t DV) {
    return ROWS*DK + 2*ROWS*KV + ROWS*DV + KV*DV + KV*DK + CACHE_LINE_SIZE_F32;
}

// Only what this kernel knows of the op: q, k, v, mask and sinks as sources,
// and scale, max_bias, logit_softcap and precision as parameters. Anything
// more is a feature upstream added after this kernel was written: upstream's
// kernel takes it.
bool knows(const ggml_tensor * dst) {
    for (int i = 5; i < GGML_MAX_SRC; i++) {
        if (dst->src[i] != nullptr) {
            return false;
        }
    }
    for (size_t i = 4; i < GGML_MAX_OP_PARAMS / sizeof(int32_t); i++) {
        if (dst->op_params[i] != 0) {
            return false;
        }
    }
    return true;
}

// The shapes this kernel takes; the same answer on every thread. Below two
// tiles of visible cache upstream's loop does less work (it skips masked
// tokens one at a time, this kernel a tile at a time), and is as fast or faster.
// The scratch ggml planned must hold this kernel's tiles: were upstream to
// plan less, upstream's kernel runs rather than this one writing past it.
bool takes(const ggml_compute_params * params, const ggml_tensor * dst) {
    const ggml_tensor * q    = dst->src[0];
    const ggml_tensor * k    = dst->src[1];
    const ggml_tensor * v    = dst->src[2];
    const ggml_tensor * mask = dst->src[3];

    float max_bias      = 0.0f;
    float logit_softcap = 0.0f;
    memcpy(&max_bias,      (const float *) dst->op_params + 1, sizeof(float));
    memcpy(&logit_softcap, (const float *) dst->op_params + 2, sizeof(float));

    const int64_t n_tokens = q->ne[1];
    const bool kv_type = (k->type == GGML_TYPE_F16 || k->type == GGML_TYPE_F32) && v->type == k->type;
    const size_t scratch = (size_t) params->nth * scratch_per_thread(k->ne[0], v->ne[0]) * sizeof(float);
    return enabled.load(std::memory_order_relaxed)
        && knows(dst)
        && params->wsize >= scratch
        && !params->use_ref
        && n_tokens >= 2 && n_tokens < ROWS
        && q->type == GGML_TYPE_F32 && kv_type
        && (mask == nullptr || mask->type == GGML_TYPE_F16)
        && dst->src[4] == nullptr // attention sinks
        && max_bias == 0.0f && logit_softcap == 0.0f
        && (dst->op_params[3] == GGML_PREC_DEFAULT || dst->op_params[3] == GGML_PREC_F32)
        && k->ne[2] == v->ne[2] && k->ne[3] == v->ne[3]
        && q->ne[2] % k->ne[2] == 0 && q->ne[3] % k->ne[3] == 0
        && q->ne[2] / k->ne[2] <= ROWS // a group's heads fit one tile
        && q->ne[0] <= ROWS * 4 && v->ne[0] <= ROWS * 4 // head sizes the scratch holds
        && v->ne[0] % 16 == 0
        && q->nb[0] == sizeof(float)
        && k->nb[0] == ggml_type_size(k->type) && v->nb[0] == ggml_type_size(v->type)
        && dst->nb[0] == sizeof(float)
        && span(q, k, mask) >= 2*KV;
}

// K rows [ic, ic + n) of one KV head as f32, transposed (KV contiguous: the
// GEMM's vector dimension); columns past n are zero.
void pack_k(float * out, const ggml_tensor * k, int64_t ic, int64_t n, int64_t ik2, int64_t ik3) {
    const int64_t DK = k->ne[0];
    float row[ROWS * 4];
    for (int64_t tk = 0; tk < n; tk++) {
        const char * src = (const char *) k->data + (ic + tk)*k->nb[1] + ik2*k->nb[2] + ik3*k->nb[3];
        if (k->type == GGML_TYPE_F16) {
            ggml_cpu_fp16_to_fp32((const ggml_fp16_t *) src, row, DK);
        } else {
            memcpy(row, src, DK*sizeof(float));
        }
        for (int64_t dk = 0; dk < DK; dk++) {
            out[dk*KV + tk] = row[dk];
        }
    }
    for (int64_t dk = 0; n < KV && dk < DK; dk++) {
        memset(out + dk*KV + n, 0, (KV - n)*sizeof(float));
    }
}

// V rows [ic, ic + n) of one KV head as f32, row-major; rows past n are zero.
void pack_v(float * out, const ggml_tensor * v, int64_t ic, int64_t n, int64_t iv2, int64_t iv3) {
    const int64_t DV = v->ne[0];
    for (int64_t tk = 0; tk < n; tk++) {
        const char * src = (const char *) v->data + (ic + tk)*v->nb[1] + iv2*v->nb[2] + iv3*v->nb[3];
        if (v->type == GGML_TYPE_F16) {
            ggml_cpu_fp16_to_fp32((const ggml_fp16_t *) src, out + tk*DV, DV);
        } else {
            memcpy(out + tk*DV, src, DV*sizeof(float));
        }
    }
    if (n < KV) {
        memset(out + n*DV, 0, (KV - n)*DV*sizeof(float));
    }
}

// The per-thread scratch ggml plans for upstream's tiled kernel (ggml-cpu.c),
// laid out as there: Q, KQ, mask, VKQ, V, K.
struct Scratch {
    float * Q;
    float * KQ;
    float * mask32;
    float * VKQ;
    float * V32;
    float * K32;

    Scratch(const ggml_compute_params * params, int ith, int64_t DK, int64_t DV) {
        Q      = (float *) params->wdata + ith*scratch_per_thread(DK, DV);
        KQ     = Q + ROWS*DK;
        mask32 = KQ + ROWS*KV;
        VKQ    = mask32 + ROWS*KV;
        V32    = VKQ + ROWS*DV;
        K32    = V32 + KV*DV;
    }
};

// Which query rows a tile holds: tokens [t0, t0 + nt) in every head of KV head
// ik2's group, of stream iq3. Row r is head ik2*group + r/nt, token t0 + r%nt.
struct Tile {
    int64_t iq3;
    int64_t ik2;
    int64_t t0;
    int64_t nt;
};

// One tile over cached tokens [c0, c1), in scratch w: leaves there the rows'
// unnormalised sums of V (VKQ) and, per row, the running maximum M and sum of
// weights S of the online softmax. Returns the tile's row count.
int64_t attend(const ggml_tensor * dst, const Scratch & w, const Tile & t,
               int64_t c0, int64_t c1, float * M, float * S) {
    const ggml_tensor * q    = dst->src[0];
    const ggml_tensor * k    = dst->src[1];
    const ggml_tensor * v    = dst->src[2];
    const ggml_tensor * mask = dst->src[3];

    const int64_t DK    = k->ne[0];
    const int64_t DV    = v->ne[0];
    const int64_t group = q->ne[2] / k->ne[2];
    const int64_t ik3   = t.iq3 / (q->ne[3] / k->ne[3]);
    const int64_t R     = group * t.nt;

    float scale;
    memcpy(&scale, (const float *) dst->op_params + 0, sizeof(float));

    const ggml_fp16_t * mrow[ROWS];

    for (int64_t r = 0; r < R; r++) {
        const int64_t iq2 = t.ik2*group + r/t.nt;
        const int64_t iq1 = t.t0 + r%t.nt;
        const float * src = (const float *) ((const char *) q->data + iq1*q->nb[1] + iq2*q->nb[2] + t.iq3*q->nb[3]);
        for (int64_t d = 0; d < DK; d++) {
            w.Q[r*DK + d] = src[d]*scale;
        }
        mrow[r] = mask ? (const ggml_fp16_t *) ((const char *) mask->data + iq1*mask->nb[1]
                                                + (iq2 % mask->ne[2])*mask->nb[2] + (t.iq3 % mask->ne[3])*mask->nb[3])
                       : nullptr;
        M[r] = -INFINITY;
        S[r] = 0.0f;
    }
    memset(w.VKQ, 0, R*DV*sizeof(float));

    for (int64_t ic = c0; ic < c1; ic += KV) {
        const int64_t n = std::min(KV, c1 - ic);

        // The mask, -inf past the range's end; a tile masked out for every row is skipped.
        bool any = false;
        for (int64_t r = 0; r < R; r++) {
            float * m = w.mask32 + r*KV;
            for (int64_t tk = 0; tk < n; tk++) {
                m[tk] = mrow[r] ? GGML_CPU_FP16_TO_FP32(mrow[r][ic + tk]) : 0.0f;
                any |= m[tk] != -INFINITY;
            }
            for (int64_t tk = n; tk < KV; tk++) {
                m[tk] = -INFINITY;
            }
        }
        if (!any) {
            continue;
        }

        pack_k(w.K32, k, ic, n, t.ik2, ik3);
        memset(w.KQ, 0, R*KV*sizeof(float));
        simd_gemm(w.KQ, w.Q, w.K32, R, DK, KV);
        ggml_vec_add_f32(R*KV, w.KQ, w.KQ, w.mask32);

        // Online softmax, a tile at a time; KQ becomes the tile's weights.
        for (int64_t r = 0; r < R; r++) {
            float * row = w.KQ + r*KV;
            float tile_max;
            ggml_vec_max_f32(KV, &tile_max, row);
            if (tile_max == -INFINITY) {
                memset(row, 0, KV*sizeof(float));
                continue;
            }
            const float m_new = std::max(M[r], tile_max);
            if (m_new > M[r]) {
                const float ms = expf(M[r] - m_new);
                ggml_vec_scale_f32(DV, w.VKQ + r*DV, ms);
                S[r] *= ms;
                M[r] = m_new;
            }
            S[r] += (float) ggml_vec_soft_max_f32(KV, row, row, m_new);
        }

        pack_v(w.V32, v, ic, n, t.ik2, ik3);
        simd_gemm(w.VKQ, w.KQ, w.V32, R, KV, DV);
    }
    return R;
}

// A tile's rows, normalised, to dst, permuted as upstream: (token, head) → row
// token*heads + head. A row that saw no cached token (S = 0) is zero.
void write_rows(ggml_tensor * dst, const Tile & t, int64_t R, float * VKQ, const float * S) {
    const int64_t DV    = dst->ne[0];
    const int64_t group = dst->src[0]->ne[2] / dst->src[1]->ne[2];
    for (int64_t r = 0; r < R; r++) {
        const int64_t iq2 = t.ik2*group + r/t.nt;
        const int64_t iq1 = t.t0 + r%t.nt;
        const float inv = S[r] == 0.0f ? 0.0f : 1.0f/S[r];
        ggml_vec_scale_f32(DV, VKQ + r*DV, inv);
        memcpy((char *) dst->data + (t.iq3*dst->ne[2]*dst->ne[1] + iq2 + iq1*dst->ne[1])*dst->nb[1],
               VKQ + r*DV, DV*sizeof(float));
    }
}

// Every tile over all cached tokens, tiles handed to threads as they free up.
void by_tiles(const ggml_compute_params * params, ggml_tensor * dst,
              int64_t n_tiles, int64_t per_tile, int64_t blocks) {
    const int64_t n_tokens = dst->src[0]->ne[1];
    const int64_t kv_heads = dst->src[1]->ne[2];
    const int64_t n_kv     = dst->src[1]->ne[1];

    if (params->ith == 0) {
        ggml_threadpool_chunk_set(params->threadpool, params->nth);
    }
    ggml_barrier(params->threadpool);

    const Scratch w(params, params->ith, dst->src[1]->ne[0], dst->ne[0]);
    float M[ROWS];
    float S[ROWS];
    for (int64_t i = params->ith; i < n_tiles; i = ggml_threadpool_chunk_add(params->threadpool, 1)) {
        const int64_t t0 = (i % blocks)*per_tile;
        const Tile t = { i / (blocks*kv_heads), (i / blocks) % kv_heads, t0, std::min(per_tile, n_tokens - t0) };
        const int64_t R = attend(dst, w, t, 0, n_kv, M, S);
        write_rows(dst, t, R, w.VKQ, S);
    }
}

// Fewer tiles than threads (few KV heads, few tokens): each tile's cached
// tokens are cut into `parts` ranges of whole KV tiles, one thread each (thread
// ith: tile ith / parts, range ith % parts). Each range's softmax state stays
// in its thread's scratch (M and S copied to where KQ was); once all are done, the
// thread of a tile's first range merges the others' into its own, the same
// rescaling the online softmax does from one KV tile to the next.
void by_ranges(const ggml_compute_params * params, ggml_tensor * dst,
               int64_t n_tiles, int64_t per_tile, int64_t blocks, int64_t parts, int64_t visible) {
    const int64_t n_tokens = dst->src[0]->ne[1];
    const int64_t kv_heads = dst->src[1]->ne[2];
    const int64_t n_kv     = dst->src[1]->ne[1];
    const int64_t DK       = dst->src[1]->ne[0];
    const int64_t DV       = dst->ne[0];
    const int64_t kv_tiles = (visible + KV - 1)/KV;

    const int64_t i    = params->ith / parts;
    const int64_t part = params->ith % parts;
    const bool working = i < n_tiles;
    Tile t = {};
    int64_t R = 0;
    const Scratch w(params, params->ith, DK, DV);
    float M[ROWS];
    float S[ROWS];
    if (working) {
        const int64_t t0 = (i % blocks)*per_tile;
        t = { i / (blocks*kv_heads), (i / blocks) % kv_heads, t0, std::min(per_tile, n_tokens - t0) };
        const int64_t c0 = KV*(kv_tiles*part/parts);
        const int64_t c1 = part == parts - 1 ? n_kv : KV*(kv_tiles*(part + 1)/parts);
        R = attend(dst, w, t, c0, c1, M, S);
        memcpy(w.KQ, M, R*sizeof(float));
        memcpy(w.KQ + ROWS, S, R*sizeof(float));
    }
    ggml_barrier(params->threadpool);
    if (!working || part != 0) {
        return;
    }

    for (int64_t p = 1; p < parts; p++) {
        const Scratch other(params, params->ith + p, DK, DV);
        const float * Mp = other.KQ;
        const float * Sp = other.KQ + ROWS;
        for (int64_t r = 0; r < R; r++) {
            if (Mp[r] == -INFINITY) {
                continue;
            }
            const float m_new = std::max(M[r], Mp[r]);
            const float ours = M[r] == -INFINITY ? 0.0f : expf(M[r] - m_new);
            const float theirs = expf(Mp[r] - m_new);
            ggml_vec_scale_f32(DV, w.VKQ + r*DV, ours);
            ggml_vec_mad_f32(DV, w.VKQ + r*DV, other.VKQ + r*DV, theirs);
            S[r] = S[r]*ours + Sp[r]*theirs;
            M[r] = m_new;
        }
    }
    write_rows(dst, t, R, w.VKQ, S);
}

// Computes the op; whether it split the cached tokens among threads.
bool small_batch(const ggml_compute_params * params, ggml_tensor * dst) {
    const ggml_tensor * q = dst->src[0];
    const ggml_tensor * k = dst->src[1];

    const int64_t n_tokens   = q->ne[1];
    const int64_t group      = q->ne[2] / k->ne[2];
    const int64_t kv_heads   = k->ne[2];
    const int64_t streams    = q->ne[3];
    const int nth = params->nth;

    // Tokens per tile: as many as fit beside the group's heads, fewer while that
    // leaves a thread without a tile (down to 4 tokens, below which the tile's
    // K and V conversions outweigh its arithmetic).
    int64_t per_tile = std::max<int64_t>(1, ROWS / group);
    auto tiles = [&](int64_t per) { return streams*kv_heads*((n_tokens + per - 1)/per); };
    while (tiles(per_tile) < 2*nth && per_tile > 4) {
        per_tile = (per_tile + 1)/2;
    }
    const int64_t blocks = (n_tokens + per_tile - 1)/per_tile;
    const int64_t n_tiles = tiles(per_tile);

    // Still fewer tiles than threads: split the cached tokens too, each range
    // at least two KV tiles of the visible cache.
    const int64_t visible = span(q, k, dst->src[3]);
    const int64_t parts = std::min<int64_t>(nth / n_tiles, visible / (2*KV));
    if (parts >= 2) {
        by_ranges(params, dst, n_tiles, per_tile, blocks, parts, visible);
        return true;
    }
    by_tiles(params, dst, n_tiles, per_tile, blocks);
    return false;
}

thread_local uint64_t calls = 0;
thread_local uint64_t split_calls = 0;

} // namespace

extern "C" uint64_t rbee_flash_attn_small_calls(void) {
    return calls;
}

extern "C" uint64_t rbee_flash_attn_small_split_calls(void) {
    return split_calls;
}

extern "C" void rbee_flash_attn_small_enable(bool on) {
    enabled.store(on, std::memory_order_relaxed);
}

extern "C" void ggml_compute_forward_flash_attn_ext(
        const struct ggml_compute_params * params, struct ggml_tensor * dst) {
    if (takes(params, dst)) {
        const bool split = small_batch(params, dst);
        if (params->ith == 0) {
            calls++;
            split_calls += split;
        }
    } else {
        ggml_compute_forward_flash_attn_ext_upstream(params, dst);
    }
}
