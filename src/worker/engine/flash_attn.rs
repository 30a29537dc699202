//! Tests of the flash-attention kernel rbee gives llama.cpp's CPU backend for
//! small batches over a long cache (vendor/ggml-cpu, README there): ggml's own
//! attention op, on random tensors of the shapes llama.cpp builds, against a
//! plain softmax(Q·Kᵀ·scale + mask)·V in f64. No model; the kernel's code is C++,
//! so these tests are all of this module.

#![cfg(test)]

use llama_cpp_sys_2 as ggml;
use std::ptr;

use super::kernel;

/// One attention op: `tokens` query tokens of `heads` heads (sharing `kv_heads`
/// KV heads) in each of `streams` sequences, over `n_kv` cache cells of which
/// the first `depth` precede the batch (causal within it, cells past it masked),
/// with every cell in `holes` masked too (another conversation's, say).
#[derive(Clone, Copy)]
struct Case {
    dk: i64,
    dv: i64,
    tokens: i64,
    heads: i64,
    kv_heads: i64,
    streams: i64,
    n_kv: i64,
    depth: i64,
    holes: (i64, i64),
    f16: bool,
    /// Q, K and V as llama.cpp's graph makes them: permuted views (heads and
    /// tokens swapped), not contiguous tensors.
    permuted: bool,
    /// How large Q's values are (2: ordinary; larger: logits in the hundreds).
    amp: f32,
    /// A feature of the op the kernel must leave to upstream's.
    extra: Extra,
}

/// What the op may carry beyond plain attention.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Extra {
    None,
    /// ALiBi positional biases (`max_bias`).
    Alibi,
    /// Logit soft-capping (Gemma 2).
    Softcap,
    /// Attention sinks (gpt-oss).
    Sinks,
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
        c <= self.depth + t && !(self.holes.0..self.holes.1).contains(&c)
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

    /// softmax(Q·Kᵀ·scale + mask)·V in f64, as [stream][token][head][dv].
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
                        want.push(acc / sum);
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

/// Which kernel serves is one switch for the whole process: a test that turns
/// it holds this, and every test that runs the op takes it too.
static SWITCH: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// The op's output through ggml (`threads` threads) and the reference, both as
/// [stream][token][head][dv], and whether the small-batch kernel computed it.
fn attend(case: Case, threads: i32) -> (Vec<f32>, Vec<f64>, bool) {
    let _serving = SWITCH.read().unwrap_or_else(|p| p.into_inner());
    run_op(case, threads)
}

fn run_op(case: Case, threads: i32) -> (Vec<f32>, Vec<f64>, bool) {
    let Case {
        dk,
        dv,
        tokens,
        heads,
        kv_heads,
        streams,
        n_kv,
        f16,
        ..
    } = case;
    let kv_type = if f16 {
        ggml::GGML_TYPE_F16
    } else {
        ggml::GGML_TYPE_F32
    };
    let scale = 1.0 / (dk as f32).sqrt();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (tokens * 7919 + n_kv) as u64);

    // SAFETY: a ggml context owns every tensor below and outlives all uses of
    // them; each tensor's data is written within its ggml_nbytes, as the type
    // and shape it was made with (contiguous: ggml_new_tensor_4d makes it so).
    unsafe {
        ggml::ggml_cpu_init();
        let ctx = ggml::ggml_init(ggml::ggml_init_params {
            mem_size: 256 << 20,
            mem_buffer: ptr::null_mut(),
            no_alloc: false,
        });
        assert!(!ctx.is_null());
        // Permuted: made [d, heads, tokens] as llama.cpp's projections are, then
        // viewed [d, tokens, heads] (the middle axes swapped, not contiguous).
        let new = |t, d, a, b| match case.permuted {
            false => ggml::ggml_new_tensor_4d(ctx, t, d, a, b, streams),
            true => ggml::ggml_new_tensor_4d(ctx, t, d, b, a, streams),
        };
        let q = new(ggml::GGML_TYPE_F32, dk, tokens, heads);
        let k = new(kv_type, dk, n_kv, kv_heads);
        let v = new(kv_type, dv, n_kv, kv_heads);
        let mask = ggml::ggml_new_tensor_4d(ctx, ggml::GGML_TYPE_F16, n_kv, tokens, 1, streams);

        let mut random = |n: i64, amp: f32| (0..n).map(|_| rng.next() * amp).collect::<Vec<f32>>();
        let mut qs = fill(q, random(dk * tokens * heads * streams, case.amp), false);
        let mut ks = fill(k, random(dk * n_kv * kv_heads * streams, 2.0), f16);
        let mut vs = fill(v, random(dv * n_kv * kv_heads * streams, 1.0), f16);
        fill(mask, case.mask(), true);
        let (q, k, v) = match case.permuted {
            false => (q, k, v),
            true => {
                qs = swap_middle(&qs, dk, heads, tokens, streams);
                ks = swap_middle(&ks, dk, kv_heads, n_kv, streams);
                vs = swap_middle(&vs, dv, kv_heads, n_kv, streams);
                let view = |t| ggml::ggml_permute(ctx, t, 0, 2, 1, 3);
                (view(q), view(k), view(v))
            }
        };
        let (max_bias, softcap) = match case.extra {
            Extra::Alibi => (8.0, 0.0),
            Extra::Softcap => (0.0, 30.0),
            _ => (0.0, 0.0),
        };
        let out = ggml::ggml_flash_attn_ext(ctx, q, k, v, mask, scale, max_bias, softcap);
        if case.extra == Extra::Sinks {
            let sinks = ggml::ggml_new_tensor_1d(ctx, ggml::GGML_TYPE_F32, heads);
            fill(sinks, random(heads, 1.0), false);
            ggml::ggml_flash_attn_ext_add_sinks(out, sinks);
        }
        let (got, small) = compute(ctx, out, threads);

        let want = case.reference(&qs, &ks, &vs, scale);
        (got, want, small)
    }
}

/// `values` written into tensor `t` (as f16 with `as_f16`); the values as the
/// tensor holds them (f16-rounded where f16), for the reference.
///
/// # Safety
/// `t` is a contiguous tensor of `values.len()` elements of that type.
unsafe fn fill(t: *mut ggml::ggml_tensor, values: Vec<f32>, as_f16: bool) -> Vec<f32> {
    let n = values.len();
    if as_f16 {
        let data = ggml::ggml_get_data(t) as *mut u16;
        ggml::ggml_fp32_to_fp16_row(values.as_ptr(), data, n as i64);
        let mut back = vec![0f32; n];
        ggml::ggml_fp16_to_fp32_row(data, back.as_mut_ptr(), n as i64);
        back
    } else {
        ptr::copy_nonoverlapping(values.as_ptr(), ggml::ggml_get_data(t) as *mut f32, n);
        values
    }
}

/// Computes `out` on `threads` threads, frees the context; its values, and
/// whether the small-batch kernel computed it.
///
/// # Safety
/// `out` is an f32 tensor of `ctx`, which is not used again.
unsafe fn compute(
    ctx: *mut ggml::ggml_context,
    out: *mut ggml::ggml_tensor,
    threads: i32,
) -> (Vec<f32>, bool) {
    let graph = ggml::ggml_new_graph(ctx);
    ggml::ggml_build_forward_expand(graph, out);
    let before = kernel::calls();
    assert_eq!(
        ggml::ggml_graph_compute_with_ctx(ctx, graph, threads),
        ggml::GGML_STATUS_SUCCESS
    );
    let small = kernel::calls() > before;
    let n_out = ggml::ggml_nelements(out) as usize;
    let got = std::slice::from_raw_parts(ggml::ggml_get_data(out) as *const f32, n_out).to_vec();
    ggml::ggml_free(ctx);
    (got, small)
}

fn max_error(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(g, w)| (f64::from(*g) - w).abs())
        .fold(0.0, f64::max)
}

/// SmolLM2's attention (64-wide heads, 9 query heads on 3 KV heads) for a
/// chat's next turn: 18 tokens over 1,450 cached, cache padded to 1,536 cells.
const TURN: Case = Case {
    dk: 64,
    dv: 64,
    tokens: 18,
    heads: 9,
    kv_heads: 3,
    streams: 1,
    n_kv: 1536,
    depth: 1450,
    holes: (0, 0),
    f16: true,
    permuted: false,
    amp: 2.0,
    extra: Extra::None,
};

#[test]
fn a_turn_over_a_long_cache_takes_the_small_batch_kernel_and_matches_the_reference() {
    for threads in [1, 2, 3] {
        let (got, want, small) = attend(TURN, threads);
        assert!(small, "{threads} threads: the small-batch kernel did not run (is vendor/ggml-cpu/rbee.cmake in the build?)");
        let error = max_error(&got, &want);
        assert!(error < 1e-4, "{threads} threads: off by {error}");
    }
}

#[test]
fn batch_sizes_head_groups_and_cache_layouts_match_the_reference() {
    let cases = [
        Case { tokens: 2, ..TURN },
        Case { tokens: 63, ..TURN },
        // A cache not a whole number of tiles, a part masked out (a whole tile in
        // it), f32 cells.
        Case {
            n_kv: 1000,
            depth: 900,
            holes: (100, 300),
            ..TURN
        },
        Case {
            f16: false,
            n_kv: 700,
            depth: 650,
            ..TURN
        },
        // No grouping (one KV head per query head), a grouping of 8 (a 7B
        // llama's 32 on 4), 128-wide heads, several sequences in one op.
        Case {
            heads: 4,
            kv_heads: 4,
            ..TURN
        },
        Case {
            heads: 32,
            kv_heads: 4,
            dk: 128,
            dv: 128,
            tokens: 5,
            n_kv: 512,
            depth: 400,
            ..TURN
        },
        Case {
            streams: 3,
            tokens: 7,
            n_kv: 600,
            depth: 300,
            ..TURN
        },
    ];
    for case in cases {
        let (got, want, small) = attend(case, 2);
        let what = format!(
            "{} tokens, {}/{} heads, {} cells",
            case.tokens, case.heads, case.kv_heads, case.n_kv
        );
        assert!(small, "{what}: not the small-batch kernel");
        let error = max_error(&got, &want);
        assert!(error < 1e-4, "{what}: off by {error}");
    }
}

#[test]
fn other_shapes_keep_llama_cpps_kernels_and_still_match() {
    // One token (decoding), 64 tokens (upstream's tiled kernel), a short cache
    // (upstream's loop is faster there): the renamed upstream entry point runs.
    let cases = [
        Case { tokens: 1, ..TURN },
        Case { tokens: 64, ..TURN },
        Case {
            depth: 40,
            n_kv: 256,
            ..TURN
        },
    ];
    for case in cases {
        let (got, want, small) = attend(case, 2);
        assert!(
            !small,
            "{} tokens over {}: the small-batch kernel ran",
            case.tokens, case.depth
        );
        // Upstream's one-token loop accumulates in f16.
        let error = max_error(&got, &want);
        assert!(
            error < 5e-3,
            "{} tokens over {}: off by {error}",
            case.tokens,
            case.depth
        );
    }
}

#[test]
fn rbee_attn_kernel_upstream_hands_every_shape_to_llama_cpps_kernel() {
    let _switching = SWITCH.write().unwrap_or_else(|p| p.into_inner());
    kernel::Kernel::Upstream.serve();
    let (got, want, small) = run_op(TURN, 2);
    kernel::Kernel::Rbee.serve();
    assert!(!small, "the small-batch kernel ran though turned off");
    // Upstream's loop accumulates in f16.
    let error = max_error(&got, &want);
    assert!(error < 5e-3, "off by {error}");
    let (_, _, small) = run_op(TURN, 2);
    assert!(small, "turned on again, the small-batch kernel did not run");
}

#[test]
fn the_shapes_llama_cpp_makes_match_the_reference() {
    let mut cases = vec![
        // Permuted views, as the graph builds Q, K and V.
        Case {
            permuted: true,
            ..TURN
        },
        Case {
            permuted: true,
            streams: 2,
            tokens: 9,
            ..TURN
        },
        // Logits in the hundreds: the online softmax must not overflow.
        Case { amp: 60.0, ..TURN },
        // More threads than tiles (below): one KV head, two tokens.
        Case {
            heads: 2,
            kv_heads: 1,
            tokens: 2,
            ..TURN
        },
        // K and V of different head sizes.
        Case {
            dk: 128,
            dv: 64,
            ..TURN
        },
    ];
    // Head sizes of real models.
    for d in [80, 96, 128, 256] {
        cases.push(Case {
            dk: d,
            dv: d,
            n_kv: 512,
            depth: 450,
            ..TURN
        });
    }
    // Groups of 1–8 query heads on 1–8 KV heads.
    for kv_heads in [1, 2, 4, 8] {
        for group in [1, 2, 4, 8] {
            cases.push(Case {
                heads: kv_heads * group,
                kv_heads,
                tokens: 6,
                n_kv: 384,
                depth: 300,
                ..TURN
            });
        }
    }
    for case in cases {
        for threads in [2, 8] {
            let (got, want, small) = attend(case, threads);
            let what = format!(
                "{threads} threads, {}×{} head size, {}/{} heads, {} tokens, amp {}, permuted {}",
                case.dk, case.dv, case.heads, case.kv_heads, case.tokens, case.amp, case.permuted
            );
            assert!(small, "{what}: not the small-batch kernel");
            let error = max_error(&got, &want);
            assert!(error < 1e-4, "{what}: off by {error}");
        }
    }
}

#[test]
fn what_the_kernel_does_not_know_reaches_upstreams() {
    for extra in [Extra::Alibi, Extra::Softcap, Extra::Sinks] {
        let (got, _, small) = attend(Case { extra, ..TURN }, 2);
        assert!(!small, "{extra:?}: the small-batch kernel ran");
        assert!(got.iter().all(|x| x.is_finite()), "{extra:?}: not finite");
    }
}
