//! ggml's own attention op, on random tensors of the shapes llama.cpp builds,
//! against a plain softmax(Q·Kᵀ·scale + mask)·V in f64: what checks the
//! flash-attention kernel rbee gives llama.cpp's CPU backend for small batches
//! over a long cache (vendor/ggml-cpu, README there). The worker runs a few
//! cases of its model's shape at start (`kernel::self_test`); the tests below
//! run many (no model; the kernel's code is C++, so they are all of its tests).

use llama_cpp_sys_2 as ggml;
use std::ptr;

use super::kernel;

/// One attention op: `tokens` query tokens of `heads` heads (sharing `kv_heads`
/// KV heads) in each of `streams` sequences, over `n_kv` cache cells of which
/// the first `depth` precede the batch (causal within it, cells past it masked),
/// with every cell in `holes` masked too (another conversation's, say).
#[derive(Clone, Copy, Debug)]
pub(super) struct Case {
    pub dk: i64,
    pub dv: i64,
    pub tokens: i64,
    pub heads: i64,
    pub kv_heads: i64,
    pub streams: i64,
    pub n_kv: i64,
    pub depth: i64,
    pub holes: (i64, i64),
    /// How many of the batch's first tokens see no cell at all (rows wholly masked).
    pub blind: i64,
    /// The type of the K and V cells (f16 as llama.cpp's default cache).
    pub kv: ggml::ggml_type,
    /// Q, K and V as llama.cpp's graph makes them: permuted views (heads and
    /// tokens swapped), not contiguous tensors.
    pub permuted: bool,
    /// How large Q's values are (2: ordinary; larger: logits in the hundreds).
    pub amp: f32,
    /// A feature of the op the kernel must leave to upstream's.
    pub extra: Extra,
}

/// What the op may carry beyond plain attention.
// The self-test runs plain attention only; the tests run every variant.
#[cfg_attr(not(test), allow(dead_code))]
#[derive(Clone, Copy, PartialEq, Debug)]
pub(super) enum Extra {
    None,
    /// ALiBi positional biases (`max_bias`).
    Alibi,
    /// Logit soft-capping (Gemma 2).
    Softcap,
    /// Attention sinks (gpt-oss).
    Sinks,
    /// V with fewer heads than K (broadcast differently).
    VBroadcast,
}

/// `values` of a tensor laid out [a, b, c, d] as the same tensor laid out
/// [a, c, b, d] (what a permute of the middle axes makes of it).
fn swap_middle(values: &[f32], a: i64, b: i64, c: i64, d: i64) -> Vec<f32> {
    let mut out = vec![0f32; values.len()];
    for l in 0..d {
        for k in 0..c {
            for j in 0..b {
                for i in 0..a {
                    out[(i + a * (k + c * (j + b * l))) as usize] =
                        values[(i + a * (j + b * (k + c * l))) as usize];
                }
            }
        }
    }
    out
}

impl Case {
    /// Whether batch token `t` sees cache cell `c`.
    fn visible(&self, t: i64, c: i64) -> bool {
        t >= self.blind && c <= self.depth + t && !(self.holes.0..self.holes.1).contains(&c)
    }

    /// The mask as llama.cpp builds it: 0 where a token sees a cell, -∞ elsewhere.
    fn mask(&self) -> Vec<f32> {
        let mut ms = Vec::new();
        for _ in 0..self.streams {
            for t in 0..self.tokens {
                ms.extend((0..self.n_kv).map(|c| {
                    if self.visible(t, c) {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                }));
            }
        }
        ms
    }

    /// softmax(Q·Kᵀ·scale + mask)·V in f64, as [stream][token][head][dv]; a
    /// row that sees no cell is zero (as both of ggml's kernels make it).
    fn reference(&self, qs: &[f32], ks: &[f32], vs: &[f32], scale: f32) -> Vec<f64> {
        let Case {
            dk,
            dv,
            tokens,
            heads,
            kv_heads,
            streams,
            n_kv,
            ..
        } = *self;
        let group = heads / kv_heads;
        let mut want = Vec::new();
        for s in 0..streams {
            for t in 0..tokens {
                for h in 0..heads {
                    let qrow = &qs[(dk * (t + tokens * (h + heads * s))) as usize..][..dk as usize];
                    let kvh = h / group + kv_heads * s;
                    let scores: Vec<Option<f64>> = (0..n_kv)
                        .map(|c| {
                            self.visible(t, c).then(|| {
                                let krow = &ks[(dk * (c + n_kv * kvh)) as usize..][..dk as usize];
                                let dot: f64 = qrow
                                    .iter()
                                    .zip(krow)
                                    .map(|(a, b)| f64::from(*a) * f64::from(*b))
                                    .sum();
                                dot * f64::from(scale)
                            })
                        })
                        .collect();
                    let max = scores
                        .iter()
                        .flatten()
                        .cloned()
                        .fold(f64::NEG_INFINITY, f64::max);
                    let weights: Vec<f64> = scores
                        .iter()
                        .map(|s| s.map_or(0.0, |s| (s - max).exp()))
                        .collect();
                    let sum: f64 = weights.iter().sum();
                    for d in 0..dv {
                        let acc: f64 = (0..n_kv)
                            .map(|c| {
                                weights[c as usize]
                                    * f64::from(vs[(d + dv * (c + n_kv * kvh)) as usize])
                            })
                            .sum();
                        want.push(if sum == 0.0 { 0.0 } else { acc / sum });
                    }
                }
            }
        }
        want
    }
}

/// A small deterministic generator (xorshift), values in [-1, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// What one op gave: its output and the reference, both as
/// [stream][token][head][dv], whether rbee's kernel computed it, and whether
/// it split the cached tokens among threads.
pub(super) struct Outcome {
    pub got: Vec<f32>,
    pub want: Vec<f64>,
    pub small: bool,
    /// Read by the tests (the self-test takes whichever path its threads make).
    #[cfg_attr(not(test), allow(dead_code))]
    pub split: bool,
}

impl Outcome {
    /// The largest difference between the op's output and the reference (∞
    /// where the output is not a number).
    pub fn error(&self) -> f64 {
        max_error(&self.got, &self.want)
    }
}

/// `case` through ggml's attention op on `threads` threads, and the reference.
pub(super) fn run(case: Case, threads: i32) -> Result<Outcome, String> {
    let Case {
        dk,
        dv,
        tokens,
        heads,
        kv_heads,
        streams,
        n_kv,
        ..
    } = case;
    // The tensors (f32 at most), the output, and the kernels' scratch: under
    // 1 MiB a thread for head sizes up to 256.
    let floats = (dk * (tokens * heads + n_kv * kv_heads)
        + dv * (n_kv * kv_heads + tokens * heads))
        * streams
        + n_kv * tokens * streams;
    let mem_size =
        usize::try_from(floats * 4).unwrap_or(0) + (threads.max(1) as usize + 8) * (1 << 20);

    // SAFETY: the context lives until `compute` frees it, after its last use.
    unsafe {
        ggml::ggml_cpu_init();
        let ctx = ggml::ggml_init(ggml::ggml_init_params {
            mem_size,
            mem_buffer: ptr::null_mut(),
            no_alloc: false,
        });
        if ctx.is_null() {
            return Err(format!("ggml could not allocate {} MiB", mem_size >> 20));
        }
        let (out, values) = build(ctx, case);
        let (got, small, split) = compute(ctx, out, threads)?;
        // Plain attention's reference; none for what it does not model.
        let want = match case.extra {
            Extra::None => case.reference(&values[0], &values[1], &values[2], scale(case)),
            _ => Vec::new(),
        };
        Ok(Outcome {
            got,
            want,
            small,
            split,
        })
    }
}

/// The op's scale: 1/√(head size), as llama.cpp's graph sets it.
fn scale(case: Case) -> f32 {
    1.0 / (case.dk as f32).sqrt()
}

/// `case`'s op in `ctx`, on random Q, K and V (deterministic by shape) and
/// the case's mask: the op's output tensor, and Q's, K's and V's values as
/// the reference reads them (contiguous, [d, token, head, stream]).
///
/// # Safety
/// `ctx` is a ggml context with room for the case's tensors.
unsafe fn build(
    ctx: *mut ggml::ggml_context,
    case: Case,
) -> (*mut ggml::ggml_tensor, [Vec<f32>; 3]) {
    let Case {
        dk,
        dv,
        tokens,
        heads,
        kv_heads,
        streams,
        n_kv,
        kv: kv_type,
        ..
    } = case;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (tokens * 7919 + n_kv) as u64);
    // Permuted: made [d, heads, tokens] as llama.cpp's projections are, then
    // viewed [d, tokens, heads] (the middle axes swapped, not contiguous).
    let new = |t, d, a, b| match case.permuted {
        false => ggml::ggml_new_tensor_4d(ctx, t, d, a, b, streams),
        true => ggml::ggml_new_tensor_4d(ctx, t, d, b, a, streams),
    };
    let v_heads = match case.extra {
        Extra::VBroadcast => 1,
        _ => kv_heads,
    };
    let (q, k, v) = (
        new(ggml::GGML_TYPE_F32, dk, tokens, heads),
        new(kv_type, dk, n_kv, kv_heads),
        new(kv_type, dv, n_kv, v_heads),
    );
    let mask = ggml::ggml_new_tensor_4d(ctx, ggml::GGML_TYPE_F16, n_kv, tokens, 1, streams);

    // Each tensor's data is written within its ggml_nbytes, as the type and
    // shape it was made with (contiguous: ggml_new_tensor_4d makes it so).
    let mut random = |n: i64, amp: f32| (0..n).map(|_| rng.next() * amp).collect::<Vec<f32>>();
    let mut qs = fill(q, random(dk * tokens * heads * streams, case.amp));
    let mut ks = fill(k, random(dk * n_kv * kv_heads * streams, 2.0));
    let mut vs = fill(v, random(dv * n_kv * v_heads * streams, 1.0));
    fill(mask, case.mask());
    let (q, k, v) = match case.permuted {
        false => (q, k, v),
        true => {
            qs = swap_middle(&qs, dk, heads, tokens, streams);
            ks = swap_middle(&ks, dk, kv_heads, n_kv, streams);
            vs = swap_middle(&vs, dv, v_heads, n_kv, streams);
            let view = |t| ggml::ggml_permute(ctx, t, 0, 2, 1, 3);
            (view(q), view(k), view(v))
        }
    };
    let (max_bias, softcap) = match case.extra {
        Extra::Alibi => (8.0, 0.0),
        Extra::Softcap => (0.0, 30.0),
        _ => (0.0, 0.0),
    };
    let out = ggml::ggml_flash_attn_ext(ctx, q, k, v, mask, scale(case), max_bias, softcap);
    if case.extra == Extra::Sinks {
        let sinks = ggml::ggml_new_tensor_1d(ctx, ggml::GGML_TYPE_F32, heads);
        fill(sinks, random(heads, 1.0));
        ggml::ggml_flash_attn_ext_add_sinks(out, sinks);
    }
    (out, [qs, ks, vs])
}

/// `values` written into contiguous tensor `t`, in its type (f32, or
/// converted as ggml quantizes: f16, bf16, q8_0, ...); the values as the
/// tensor holds them (rounded as its type rounds), for the reference.
///
/// # Safety
/// `t` is a contiguous tensor of `values.len()` elements whose rows fit its type's blocks.
unsafe fn fill(t: *mut ggml::ggml_tensor, values: Vec<f32>) -> Vec<f32> {
    let n = values.len();
    let ty = (*t).type_;
    let data = ggml::ggml_get_data(t);
    if ty == ggml::GGML_TYPE_F32 {
        ptr::copy_nonoverlapping(values.as_ptr(), data as *mut f32, n);
        return values;
    }
    let row = (*t).ne[0];
    ggml::ggml_quantize_chunk(
        ty,
        values.as_ptr(),
        data,
        0,
        n as i64 / row,
        row,
        ptr::null(),
    );
    let mut back = vec![0f32; n];
    let to_float = (*ggml::ggml_get_type_traits(ty))
        .to_float
        .expect("every type ggml quantizes to converts back");
    to_float(data, back.as_mut_ptr(), n as i64);
    back
}

/// Computes `out` on `threads` threads, frees the context; its values, and
/// whether the small-batch kernel computed it, and whether it split the cache.
///
/// # Safety
/// `out` is an f32 tensor of `ctx`, which is not used again.
unsafe fn compute(
    ctx: *mut ggml::ggml_context,
    out: *mut ggml::ggml_tensor,
    threads: i32,
) -> Result<(Vec<f32>, bool, bool), String> {
    let graph = ggml::ggml_new_graph(ctx);
    ggml::ggml_build_forward_expand(graph, out);
    let before = (kernel::calls(), kernel::split_calls());
    let status = ggml::ggml_graph_compute_with_ctx(ctx, graph, threads);
    let small = kernel::calls() > before.0;
    let split = kernel::split_calls() > before.1;
    let n_out = ggml::ggml_nelements(out) as usize;
    let got = std::slice::from_raw_parts(ggml::ggml_get_data(out) as *const f32, n_out).to_vec();
    ggml::ggml_free(ctx);
    if status != ggml::GGML_STATUS_SUCCESS {
        return Err(format!("ggml could not compute the op (status {status})"));
    }
    Ok((got, small, split))
}

fn max_error(got: &[f32], want: &[f64]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    got.iter()
        .zip(want)
        .map(|(g, w)| match (f64::from(*g) - w).abs() {
            e if e.is_nan() => f64::INFINITY,
            e => e,
        })
        .fold(0.0, f64::max)
}

#[cfg(test)]
pub(super) mod tests;
