//! rbee's attention kernel in llama.cpp's CPU backend (`vendor/ggml-cpu`):
//! which kernel serves (`RBEE_ATTN_KERNEL=upstream` turns rbee's off and
//! leaves flash attention on, with llama.cpp's own kernel), its name for
//! `rbee --version`, the worker's log, `/props` and `/metrics`, and the
//! self-test a worker runs at start on its model's attention shape.
//!
//! The kernel's C entry points are declared here, in code every build runs:
//! a binary built without the kernel (`cargo install` without the repository's
//! `.cargo/config.toml`, CMake older than 3.19, a system ggml) fails to link
//! instead of running without it unnoticed.

extern "C" {
    /// Defined beside the kernel (flash_attn_small.cpp).
    fn rbee_flash_attn_small_enable(on: bool);
    /// How many attention ops the kernel computed in graphs this thread ran.
    fn rbee_flash_attn_small_calls() -> u64;
    /// How many of those split the cached tokens among threads.
    fn rbee_flash_attn_small_split_calls() -> u64;
}

/// The environment variable that picks the kernel.
pub const ENV: &str = "RBEE_ATTN_KERNEL";

/// rbee's kernel, as `rbee --version` lists it.
pub const NAME: &str = "fa-small";

/// Which kernel computes llama.cpp's flash attention for the shapes rbee's takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// rbee's small-batch kernel, upstream's for every other shape.
    Rbee,
    /// llama.cpp's own, for every shape.
    Upstream,
}

impl Kernel {
    /// The kernel `RBEE_ATTN_KERNEL` asks for: unset or `fa-small` rbee's,
    /// `upstream` llama.cpp's.
    pub fn from_env() -> Result<Kernel, String> {
        Kernel::parse(std::env::var(ENV).ok().as_deref())
    }

    fn parse(value: Option<&str>) -> Result<Kernel, String> {
        match value.map(str::trim) {
            None | Some("") | Some(NAME) => Ok(Kernel::Rbee),
            Some("upstream") => Ok(Kernel::Upstream),
            Some(other) => Err(format!(
                "{ENV} is {NAME} (rbee's attention kernel, the default) or upstream \
                 (llama.cpp's), not {other:?}"
            )),
        }
    }

    /// This kernel serves the attention ops that this process computes from now on.
    pub fn serve(self) {
        // SAFETY: sets an atomic flag in the kernel; callable at any time.
        unsafe { rbee_flash_attn_small_enable(self == Kernel::Rbee) }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kernel::Rbee => NAME,
            Kernel::Upstream => "upstream",
        }
    }
}

/// How many attention ops rbee's kernel computed in graphs this thread ran.
pub fn calls() -> u64 {
    // SAFETY: reads a thread-local counter; callable at any time.
    unsafe { rbee_flash_attn_small_calls() }
}

/// How many of those split the cached tokens among threads (fewer tiles than threads).
pub fn split_calls() -> u64 {
    // SAFETY: reads a thread-local counter; callable at any time.
    unsafe { rbee_flash_attn_small_split_calls() }
}

/// A model's attention: head sizes of K and V, query heads, KV heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub dk: i64,
    pub dv: i64,
    pub heads: i64,
    pub kv_heads: i64,
}

impl Shape {
    /// SmolLM2-135M's: what the self-test runs where a model's own is unknown.
    pub const SMOLLM2: Shape = Shape {
        dk: 64,
        dv: 64,
        heads: 9,
        kv_heads: 3,
    };

    /// The shape a GGUF file's metadata gives, where it is one llama.cpp's op
    /// can have (head sizes up to 512, query heads a multiple of the KV heads).
    pub fn of(info: &crate::gguf::GgufInfo) -> Option<Shape> {
        let shape = Shape {
            dk: i64::try_from(info.key_length).ok()?,
            dv: i64::try_from(info.value_length).ok()?,
            heads: i64::try_from(info.head_count).ok()?,
            kv_heads: i64::try_from(info.head_count_kv).ok()?,
        };
        let sizes = 1..=512;
        (sizes.contains(&shape.dk)
            && sizes.contains(&shape.dv)
            && (1..=256).contains(&shape.heads)
            && shape.kv_heads >= 1
            && shape.heads % shape.kv_heads == 0)
            .then_some(shape)
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let Shape {
            dk,
            dv,
            heads,
            kv_heads,
        } = self;
        match dk == dv {
            true => write!(f, "head size {dk}")?,
            false => write!(f, "head sizes {dk}/{dv}")?,
        }
        write!(f, ", {heads} query heads on {kv_heads} KV heads")
    }
}

/// What the self-test found.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// rbee's kernel computed every case and matched the reference.
    Passed,
    /// rbee's kernel takes none of this shape's ops: upstream's computed them.
    NotTaken,
    /// rbee's kernel disagreed with the reference (or the op could not run): why.
    Failed(String),
}

/// The largest difference from the f64 reference the self-test accepts (the
/// kernel's tests hold it to 1e-4; f16 cells, f32 sums).
const TOLERANCE: f64 = 1e-3;

/// rbee's kernel on a few ops of `shape` (a chat turn's batch over a long
/// cache, permuted as llama.cpp's graph makes Q, K and V; two tokens over two
/// streams with a masked hole and rows that see nothing; logits in the
/// hundreds) on `threads` threads, against the reference. Some tens of
/// milliseconds.
pub fn self_test(shape: Shape, threads: i32) -> Verdict {
    use super::flash_attn::{run, Case, Extra};
    let turn = Case {
        dk: shape.dk,
        dv: shape.dv,
        heads: shape.heads,
        kv_heads: shape.kv_heads,
        tokens: 9,
        streams: 1,
        n_kv: 512,
        depth: 420,
        holes: (0, 0),
        blind: 0,
        kv: llama_cpp_sys_2::GGML_TYPE_F16,
        permuted: true,
        amp: 2.0,
        extra: Extra::None,
    };
    let cases = [
        turn,
        Case {
            tokens: 2,
            streams: 2,
            n_kv: 448,
            holes: (64, 200),
            blind: 1,
            permuted: false,
            ..turn
        },
        Case { amp: 40.0, ..turn },
    ];
    judge(
        cases
            .iter()
            .map(|case| (format!("{case:?}"), run(*case, threads))),
    )
}

/// The verdict on the self-test's ops: each described, and its outcome.
fn judge(
    outcomes: impl Iterator<Item = (String, Result<super::flash_attn::Outcome, String>)>,
) -> Verdict {
    let mut taken = 0;
    for (case, outcome) in outcomes {
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(e) => return Verdict::Failed(format!("{e} ({case})")),
        };
        if !outcome.small {
            continue; // upstream's kernel computed it: not this test's to judge
        }
        let error = outcome.error();
        if error > TOLERANCE {
            return Verdict::Failed(format!(
                "off the reference by {error:.2e} (more than {TOLERANCE:.0e}) in {case}"
            ));
        }
        taken += usize::from(outcome.small);
    }
    match taken {
        0 => Verdict::NotTaken,
        _ => Verdict::Passed,
    }
}

/// What a worker's start found of its attention kernel.
#[derive(Debug, Clone, PartialEq)]
pub struct Chosen {
    pub kernel: Kernel,
    /// The self-test's verdict in a word: `passed`, `failed` or `not run`.
    pub verdict: &'static str,
    /// The same in a line, with why.
    pub said: String,
}

/// The kernel that serves a worker, asked for by `RBEE_ATTN_KERNEL`, once
/// rbee's has been tested on the model's shape.
pub fn choose(asked: Kernel, test: impl FnOnce() -> Verdict) -> Chosen {
    let chosen = |kernel, verdict, said: &str| Chosen {
        kernel,
        verdict,
        said: said.to_string(),
    };
    if asked == Kernel::Upstream {
        return chosen(asked, "not run", &format!("not run ({ENV}=upstream)"));
    }
    match test() {
        Verdict::Passed => chosen(Kernel::Rbee, "passed", "passed"),
        Verdict::NotTaken => chosen(
            Kernel::Rbee,
            "passed",
            "passed: this model's shapes go to llama.cpp's kernel",
        ),
        Verdict::Failed(why) => chosen(Kernel::Upstream, "failed", &format!("failed: {why}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_variable_names_a_kernel_or_is_refused() {
        assert_eq!(Kernel::parse(None), Ok(Kernel::Rbee));
        assert_eq!(Kernel::parse(Some("fa-small")), Ok(Kernel::Rbee));
        assert_eq!(Kernel::parse(Some(" upstream ")), Ok(Kernel::Upstream));
        let e = Kernel::parse(Some("off")).unwrap_err();
        assert!(
            e.contains("RBEE_ATTN_KERNEL") && e.contains("upstream"),
            "{e}"
        );
    }

    fn outcome(got: Vec<f32>, small: bool) -> super::super::flash_attn::Outcome {
        super::super::flash_attn::Outcome {
            got,
            want: vec![0.5, -0.25],
            small,
            split: false,
        }
    }

    #[test]
    fn a_kernel_off_the_reference_fails_the_self_test_and_upstreams_serves() {
        let ok = || ("a case".to_string(), Ok(outcome(vec![0.5, -0.25], true)));
        assert_eq!(judge([ok(), ok()].into_iter()), Verdict::Passed);
        let upstream = ("a case".to_string(), Ok(outcome(vec![0.5, -0.2], false)));
        assert_eq!(judge([upstream].into_iter()), Verdict::NotTaken);
        for got in [vec![0.5, -0.2], vec![f32::NAN, -0.25], vec![0.5]] {
            let off = ("the second".to_string(), Ok(outcome(got.clone(), true)));
            let verdict = judge([ok(), off].into_iter());
            assert!(
                matches!(&verdict, Verdict::Failed(why) if why.contains("the second")),
                "{got:?}: {verdict:?}"
            );
            let chosen = choose(Kernel::Rbee, || verdict);
            assert_eq!(
                (chosen.kernel, chosen.verdict),
                (Kernel::Upstream, "failed")
            );
            assert!(
                chosen.said.starts_with("failed: off the reference"),
                "{chosen:?}"
            );
        }
        let broken = (
            "a case".to_string(),
            Err("ggml could not compute".to_string()),
        );
        assert!(matches!(judge([broken].into_iter()), Verdict::Failed(_)));
    }

    #[test]
    fn rbee_attn_kernel_upstream_skips_the_self_test() {
        let chosen = choose(Kernel::Upstream, || panic!("the self-test ran"));
        assert_eq!(
            (chosen.kernel, chosen.verdict),
            (Kernel::Upstream, "not run")
        );
        assert!(
            chosen.said.contains("RBEE_ATTN_KERNEL=upstream"),
            "{chosen:?}"
        );
        assert_eq!(
            choose(Kernel::Rbee, || Verdict::Passed).kernel,
            Kernel::Rbee
        );
        assert_eq!(
            choose(Kernel::Rbee, || Verdict::NotTaken).kernel,
            Kernel::Rbee
        );
    }

    #[test]
    fn the_self_test_passes_on_real_models_shapes() {
        let _serving = super::super::flash_attn::tests::SWITCH
            .read()
            .unwrap_or_else(|p| p.into_inner());
        // SmolLM2, Llama 3.2 1B, Llama 3.1 8B, Qwen2.5 1.5B, Gemma 2B (one KV head).
        for (dk, heads, kv_heads) in [
            (64, 9, 3),
            (64, 32, 8),
            (128, 32, 8),
            (128, 12, 2),
            (256, 8, 1),
        ] {
            let shape = Shape {
                dk,
                dv: dk,
                heads,
                kv_heads,
            };
            for threads in [2, 8] {
                assert_eq!(
                    self_test(shape, threads),
                    Verdict::Passed,
                    "{shape}, {threads} threads"
                );
            }
        }
    }

    #[test]
    fn a_models_shape_comes_from_its_metadata() {
        let mut info = crate::gguf::GgufInfo {
            key_length: 128,
            value_length: 128,
            head_count: 32,
            head_count_kv: 8,
            ..Default::default()
        };
        assert_eq!(
            Shape::of(&info).map(|s| s.to_string()),
            Some("head size 128, 32 query heads on 8 KV heads".to_string())
        );
        info.head_count_kv = 0;
        assert_eq!(Shape::of(&info), None);
        info.head_count_kv = 5;
        assert_eq!(Shape::of(&info), None);
    }

    #[test]
    fn the_revision_names_the_kernels_sources() {
        use sha2::{Digest, Sha256};
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("vendor/ggml-cpu");
        let mut sources = Sha256::new();
        for file in ["flash_attn_small.cpp", "rbee.cmake"] {
            sources.update(std::fs::read(dir.join(file)).expect("the kernel's sources"));
        }
        let rev = crate::disk::hex(&sources.finalize())[..16].to_string();
        assert_eq!(
            option_env!("GGML_RBEE_KERNEL_REV"),
            Some(rev.as_str()),
            "vendor/ggml-cpu changed: set GGML_RBEE_KERNEL_REV = \"{rev}\" in .cargo/config.toml \
             (llama.cpp is then rebuilt with the kernel as it now is)"
        );
    }
}
