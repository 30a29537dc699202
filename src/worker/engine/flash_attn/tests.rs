//! The kernel's tests: ggml's op on many shapes against the reference, which
//! kernel ran, and the shapes it must leave to upstream's.

use super::*;

/// Which kernel serves is one switch for the whole process: a test that turns
/// it holds this, and every test that runs the op takes it too.
pub(in crate::worker::engine) static SWITCH: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// The op's output through ggml (`threads` threads) and the reference, both as
/// [stream][token][head][dv], and whether the small-batch kernel computed it.
fn attend(case: Case, threads: i32) -> (Vec<f32>, Vec<f64>, bool) {
    let _serving = SWITCH.read().unwrap_or_else(|p| p.into_inner());
    run_op(case, threads)
}

fn run_op(case: Case, threads: i32) -> (Vec<f32>, Vec<f64>, bool) {
    let Outcome {
        got, want, small, ..
    } = run(case, threads).expect("the op runs");
    (got, want, small)
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
    blind: 0,
    kv: ggml::GGML_TYPE_F16,
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
            kv: ggml::GGML_TYPE_F32,
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
    let extras = [
        Extra::Alibi,
        Extra::Softcap,
        Extra::Sinks,
        Extra::VBroadcast,
    ];
    for extra in extras {
        let (got, _, small) = attend(Case { extra, ..TURN }, 2);
        assert!(!small, "{extra:?}: the small-batch kernel ran");
        assert!(got.iter().all(|x| x.is_finite()), "{extra:?}: not finite");
    }
    // Quantized and BF16 caches (llama.cpp's --cache-type-k/v): upstream's
    // kernel computes them, and close to the reference on the values the
    // cells hold.
    for kv in [
        ggml::GGML_TYPE_Q8_0,
        ggml::GGML_TYPE_Q4_0,
        ggml::GGML_TYPE_BF16,
    ] {
        let (got, want, small) = attend(Case { kv, ..TURN }, 2);
        assert!(!small, "type {kv}: the small-batch kernel ran");
        let error = max_error(&got, &want);
        assert!(error < 2e-2, "type {kv}: off by {error}");
    }
}

#[test]
fn rows_that_see_no_cell_are_zero_in_both_kernels() {
    // The batch's first three tokens see nothing (as a padded row would).
    let case = Case { blind: 3, ..TURN };
    let row = (case.heads * case.dv) as usize;
    let _switching = SWITCH.write().unwrap_or_else(|p| p.into_inner());
    for kernel in [kernel::Kernel::Rbee, kernel::Kernel::Upstream] {
        kernel.serve();
        let (got, want, small) = run_op(case, 2);
        kernel::Kernel::Rbee.serve();
        assert_eq!(small, kernel == kernel::Kernel::Rbee, "{kernel:?}");
        // Upstream's loop accumulates in f16.
        let error = max_error(&got, &want);
        assert!(error < 5e-3, "{kernel:?}: off by {error}");
        assert!(
            got[..3 * row].iter().all(|x| *x == 0.0),
            "{kernel:?}: a blind row is not zero"
        );
        assert!(got[3 * row..].iter().any(|x| *x != 0.0));
    }
}

#[test]
fn fewer_tiles_than_threads_split_the_cache_among_them_and_still_match() {
    // One KV head (Gemma 2B's 8 query heads on 1), a few tokens: one or two
    // tiles for 4-16 threads. The cache is not a whole number of tiles, a part
    // of it is masked out wholly (a range with nothing to see), a row sees nothing.
    let few = Case {
        heads: 8,
        kv_heads: 1,
        dk: 256,
        dv: 256,
        tokens: 3,
        n_kv: 1000,
        depth: 990,
        holes: (130, 520),
        blind: 1,
        ..TURN
    };
    let cases = [
        few,
        Case { tokens: 5, ..few },
        Case {
            heads: 2,
            kv_heads: 1,
            dk: 64,
            dv: 64,
            tokens: 2,
            blind: 0,
            holes: (0, 0),
            amp: 60.0,
            ..few
        },
        Case {
            permuted: true,
            streams: 2,
            ..few
        },
    ];
    let _serving = SWITCH.read().unwrap_or_else(|p| p.into_inner());
    for case in cases {
        for threads in [4, 8, 16] {
            let outcome = run(case, threads).expect("the op runs");
            let what = format!("{threads} threads, {case:?}");
            assert!(outcome.small && outcome.split, "{what}: not split");
            let error = outcome.error();
            assert!(error < 1e-4, "{what}: off by {error}");
        }
    }
    // Tiles enough for every thread: not split.
    let outcome = run(TURN, 2).expect("the op runs");
    assert!(outcome.small && !outcome.split);
}
