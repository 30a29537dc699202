//! Reads the facts a catalog needs from a GGUF file's header, without touching
//! the weights: architecture, parameter count, quantization, context length and
//! layer count, and the widths a memory estimate needs ([`estimate`]).
//!
//! The header is key/value metadata followed by tensor descriptions; the
//! weights come after both, so a model of any size is described after reading
//! a few megabytes at most (the tokenizer's vocabulary is the bulk of it).
//! Format: <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>.

use serde::{Deserialize, Serialize};
use std::io::{self, BufReader, Read};
use std::path::Path;

/// What the catalog records about a model file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GgufInfo {
    pub architecture: String,
    /// Total elements over all tensors.
    pub parameters: u64,
    /// The file type's name, such as `Q4_K_M`, or `unknown`.
    pub quantization: String,
    pub context_length: u64,
    pub layers: u64,
    /// The hidden width, and the attention heads (query and key/value) with
    /// their widths: what one token of KV cache takes per layer.
    #[serde(default)]
    pub embedding_length: u64,
    #[serde(default)]
    pub head_count: u64,
    #[serde(default)]
    pub head_count_kv: u64,
    #[serde(default)]
    pub key_length: u64,
    #[serde(default)]
    pub value_length: u64,
    /// Tokens in the vocabulary: the width of the logits.
    #[serde(default)]
    pub vocab_size: u64,
    /// Bytes of the repeating layers' weights (`blk.N.*`, all layers), and of
    /// the output layer's (`output.weight`, else the token embeddings it is
    /// tied to): what a split across machines divides ([`split_cost`]).
    #[serde(default)]
    pub layer_bytes: u64,
    #[serde(default)]
    pub output_bytes: u64,
    /// Bytes of the matrices llama.cpp's CPU backend keeps a second,
    /// interleaved copy of for its AVX2 kernels ([`repacked`]): on a CPU the
    /// weights take the file and these again.
    #[serde(default)]
    pub repacked_bytes: u64,
}

/// Bytes of a tensor of ggml type `ty` with `dims` that llama.cpp's CPU
/// backend repacks on an x86-64-v3 CPU (rbee's build; `ggml-cpu/repack.cpp`,
/// `ggml_repack_get_optimal_repack_type`): Q4_0, Q4_K, IQ4_NL and MXFP4
/// matrices with rows in whole groups of 8; 0 for any other. Token embeddings
/// are read by row, never repacked.
fn repacked(ty: u32, dims: &[u64], part: Part) -> u64 {
    // (type, elements a block, bytes a block)
    const REPACKED: [(u32, u64, u64); 4] =
        [(2, 32, 18), (12, 256, 144), (20, 32, 18), (39, 32, 17)];
    let Some(&(_, per, bytes)) = REPACKED.iter().find(|(t, _, _)| *t == ty) else {
        return 0;
    };
    if part == Part::TokenEmbeddings || dims.len() < 2 || !dims[1].is_multiple_of(8) {
        return 0;
    }
    let elements = dims.iter().fold(1u64, |n, d| n.saturating_mul(*d));
    elements / per * bytes
}

/// Reads the header of the GGUF file at `path`.
pub fn read(path: &Path) -> Result<GgufInfo, String> {
    let file = std::fs::File::open(path)
        .map_err(|e| format!("cannot open model file {}: {e}", path.display()))?;
    let len = file.metadata().ok().map(|m| m.len());
    parse_sized(&mut BufReader::with_capacity(1 << 16, file), len)
        .map_err(|e| format!("{} is not a GGUF model file ({e})", path.display()))
}

/// Reads just the layer count, for loading progress.
pub fn layer_count(path: &Path) -> Option<u32> {
    read(path).ok().and_then(|i| u32::try_from(i.layers).ok())
}

/// A metadata value: only the kinds the catalog reads are kept.
enum Value {
    Uint(u64),
    Str(String),
    /// An array, by its length.
    Array(u64),
    Other,
}

/// Largest string or array the parser accepts: a guard against corrupt headers.
const MAX_LEN: u64 = 1 << 28;

pub fn parse(r: &mut impl Read) -> io::Result<GgufInfo> {
    parse_sized(r, None)
}

/// Counts the bytes read through it: where the header ends.
struct Counted<R> {
    inner: R,
    read: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

/// Which part of the model a tensor belongs to, by its name.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Part {
    Layer,
    Output,
    TokenEmbeddings,
    Other,
}

fn part(name: &str) -> Part {
    match name {
        n if n.starts_with("blk.") => Part::Layer,
        "output.weight" => Part::Output,
        "token_embd.weight" => Part::TokenEmbeddings,
        _ => Part::Other,
    }
}

/// The header of a file `file_len` bytes long (tensor sizes come from the
/// distance between data offsets, the last one's from the file's end).
fn parse_sized(r: &mut impl Read, file_len: Option<u64>) -> io::Result<GgufInfo> {
    let r = &mut Counted { inner: r, read: 0 };
    let mut magic = [0u8; 4];
    r.read_exact(&mut magic)?;
    if &magic != b"GGUF" {
        return Err(invalid("no GGUF magic"));
    }
    let version = read_u32(r)?;
    if !(2..=3).contains(&version) {
        return Err(invalid(&format!("GGUF version {version} is not supported")));
    }
    let n_tensors = read_u64(r)?;
    let n_kv = read_u64(r)?;
    let mut architecture = String::new();
    let mut file_type = None;
    let mut numbers: Vec<(String, u64)> = Vec::new();
    let mut vocab_size = 0;
    let mut alignment = 32;
    for _ in 0..n_kv {
        let key = read_string(r)?;
        let kind = read_u32(r)?;
        match read_value(r, kind)? {
            Value::Str(s) if key == "general.architecture" => architecture = s,
            Value::Uint(n) if key == "general.file_type" => file_type = Some(n),
            Value::Uint(n) if NUMBERS.iter().any(|k| key.ends_with(k)) => numbers.push((key, n)),
            Value::Array(n) if key == "tokenizer.ggml.tokens" => vocab_size = n,
            Value::Uint(n) if key == "general.alignment" => alignment = n.max(1),
            _ => {}
        }
    }
    let number = |suffix: &str| {
        numbers
            .iter()
            .find(|(k, _)| *k == format!("{architecture}.{suffix}"))
            .map_or(0, |(_, n)| *n)
    };
    let Tensors {
        parameters,
        repacked_bytes,
        mut offsets,
    } = read_tensors(r, n_tensors)?;
    let data_start = r.read.next_multiple_of(alignment);
    let data_len = file_len.map(|len| len.saturating_sub(data_start));
    let (layer_bytes, output_bytes) = part_sizes(&mut offsets, data_len);
    let embedding_length = number("embedding_length");
    let head_count = number("attention.head_count");
    // Absent keys mean what llama.cpp takes them to mean: no grouped-query
    // attention, and heads of an equal share of the hidden width.
    let head_width = embedding_length.checked_div(head_count).unwrap_or(0);
    let or = |n: u64, default: u64| if n == 0 { default } else { n };
    Ok(GgufInfo {
        context_length: number("context_length"),
        layers: number("block_count"),
        head_count_kv: or(number("attention.head_count_kv"), head_count),
        key_length: or(number("attention.key_length"), head_width),
        value_length: or(number("attention.value_length"), head_width),
        embedding_length,
        head_count,
        vocab_size,
        architecture,
        parameters,
        quantization: file_type.map_or("unknown", file_type_name).to_string(),
        layer_bytes,
        output_bytes,
        repacked_bytes,
    })
}

/// What the tensor infos say: elements in all, the bytes llama.cpp repacks,
/// and each tensor's data offset with the part of the model it is.
struct Tensors {
    parameters: u64,
    repacked_bytes: u64,
    offsets: Vec<(u64, Part)>,
}

fn read_tensors(r: &mut impl Read, n_tensors: u64) -> io::Result<Tensors> {
    let mut t = Tensors {
        parameters: 0,
        repacked_bytes: 0,
        offsets: Vec::new(),
    };
    for _ in 0..n_tensors {
        let name = read_string(r)?;
        let n_dims = read_u32(r)?;
        if n_dims > 8 {
            return Err(invalid("tensor with more than 8 dimensions"));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(read_u64(r)?);
        }
        let ty = read_u32(r)?;
        let offset = read_u64(r)?;
        let elements = dims.iter().fold(1u64, |n, d| n.saturating_mul(*d));
        t.parameters = t.parameters.saturating_add(elements);
        t.repacked_bytes = t
            .repacked_bytes
            .saturating_add(repacked(ty, &dims, part(&name)));
        t.offsets.push((offset, part(&name)));
    }
    Ok(t)
}

/// The bytes of the repeating layers and of the output layer: each tensor
/// runs to the next one's offset (the last to the data's end, when known).
fn part_sizes(offsets: &mut [(u64, Part)], data_len: Option<u64>) -> (u64, u64) {
    offsets.sort_by_key(|(offset, _)| *offset);
    let (mut layers, mut output, mut embeddings) = (0u64, 0u64, 0u64);
    for (i, (offset, part)) in offsets.iter().enumerate() {
        let end = match offsets.get(i + 1) {
            Some((next, _)) => *next,
            None => data_len.unwrap_or(*offset),
        };
        let size = end.saturating_sub(*offset);
        match part {
            Part::Layer => layers += size,
            Part::Output => output += size,
            Part::TokenEmbeddings => embeddings += size,
            Part::Other => {}
        }
    }
    (layers, if output > 0 { output } else { embeddings })
}

/// The per-architecture numeric keys read (`{arch}.<key>`).
const NUMBERS: &[&str] = &[
    ".context_length",
    ".block_count",
    ".embedding_length",
    ".attention.head_count",
    ".attention.head_count_kv",
    ".attention.key_length",
    ".attention.value_length",
];

mod estimate;
pub use estimate::{estimate, split_cost, Estimate, SplitCost, BATCH_TOKENS};

/// llama.cpp's `llama_ftype` names.
fn file_type_name(t: u64) -> &'static str {
    match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        38 => "MXFP4_MOE",
        _ => "unknown",
    }
}

fn read_value(r: &mut impl Read, kind: u32) -> io::Result<Value> {
    Ok(match kind {
        0 | 1 | 7 => Value::Uint(u64::from(read_n::<1>(r)?[0])),
        2 | 3 => Value::Uint(u64::from(u16::from_le_bytes(read_n(r)?))),
        4 => Value::Uint(u64::from(read_u32(r)?)),
        5 => Value::Uint(u64::from(read_u32(r)?)),
        6 => {
            read_n::<4>(r)?;
            Value::Other
        }
        8 => Value::Str(read_string(r)?),
        9 => {
            let item = read_u32(r)?;
            let n = read_u64(r)?;
            if n > MAX_LEN || item == 9 {
                return Err(invalid("array too long or nested"));
            }
            for _ in 0..n {
                read_value(r, item)?;
            }
            Value::Array(n)
        }
        10 | 11 => Value::Uint(read_u64(r)?),
        12 => {
            read_n::<8>(r)?;
            Value::Other
        }
        _ => return Err(invalid(&format!("unknown metadata type {kind}"))),
    })
}

fn read_n<const N: usize>(r: &mut impl Read) -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    Ok(u32::from_le_bytes(read_n(r)?))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    Ok(u64::from_le_bytes(read_n(r)?))
}

fn read_string(r: &mut impl Read) -> io::Result<String> {
    let len = read_u64(r)?;
    if len > MAX_LEN {
        return Err(invalid("string too long"));
    }
    let mut bytes = vec![0u8; len as usize];
    r.read_exact(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn invalid(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.to_string())
}

/// The catalog name of a model file: its stem, lower-case, with every
/// character but letters, digits and `.`, `_`, `+`, `-` made a `-` (no
/// space, quote or control character), so the name goes into a URL path, a
/// command line or a unit file as it is, and every model can be named again
/// to use or remove it (`My Model.gguf` is `my-model`).
pub fn catalog_name(path: &std::path::Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let mut name = String::with_capacity(stem.len());
    for c in stem.chars() {
        let c = if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '-') {
            c
        } else {
            '-'
        };
        if !(c == '-' && name.ends_with('-')) {
            name.push(c);
        }
    }
    let name = name.trim_matches(['-', '.']);
    if name.is_empty() {
        "model".into()
    } else {
        name.to_string()
    }
}

#[cfg(test)]
pub mod tests {

    #[test]
    fn catalog_names_go_into_urls_and_commands_as_they_are() {
        let name = |p: &str| catalog_name(std::path::Path::new(p));
        assert_eq!(
            name("/m/SmolLM2-135M-Instruct.Q4_1.gguf"),
            "smollm2-135m-instruct.q4_1"
        );
        assert_eq!(name("/m/My Model.gguf"), "my-model");
        assert_eq!(name("/m/a\"b'c\nd$(x).gguf"), "a-b-c-d-x");
        assert_eq!(name("/m/modèle  v2.gguf"), "mod-le-v2");
        assert_eq!(name("/m/...gguf"), "model");
    }

    use super::*;
    use crate::protocol::CacheType;

    /// A minimal GGUF header, written the way llama.cpp writes one.
    pub fn header(
        arch: &str,
        file_type: u32,
        ctx: u32,
        blocks: u32,
        tensors: &[&[u64]],
    ) -> Vec<u8> {
        fn s(out: &mut Vec<u8>, v: &str) {
            out.extend_from_slice(&(v.len() as u64).to_le_bytes());
            out.extend_from_slice(v.as_bytes());
        }
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&6u64.to_le_bytes());
        s(&mut out, "general.architecture");
        out.extend_from_slice(&8u32.to_le_bytes());
        s(&mut out, arch);
        s(&mut out, "general.file_type");
        out.extend_from_slice(&4u32.to_le_bytes());
        out.extend_from_slice(&file_type.to_le_bytes());
        s(&mut out, &format!("{arch}.context_length"));
        out.extend_from_slice(&4u32.to_le_bytes());
        out.extend_from_slice(&ctx.to_le_bytes());
        s(&mut out, &format!("{arch}.block_count"));
        out.extend_from_slice(&4u32.to_le_bytes());
        out.extend_from_slice(&blocks.to_le_bytes());
        s(&mut out, "tokenizer.ggml.tokens");
        out.extend_from_slice(&9u32.to_le_bytes());
        out.extend_from_slice(&8u32.to_le_bytes());
        out.extend_from_slice(&2u64.to_le_bytes());
        s(&mut out, "<s>");
        s(&mut out, "hello");
        s(&mut out, "general.rope_scale");
        out.extend_from_slice(&6u32.to_le_bytes());
        out.extend_from_slice(&1.5f32.to_le_bytes());
        for (i, dims) in tensors.iter().enumerate() {
            s(&mut out, &format!("t{i}"));
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in *dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&2u32.to_le_bytes());
            out.extend_from_slice(&0u64.to_le_bytes());
        }
        out
    }

    #[test]
    fn reads_the_catalog_facts_and_skips_the_rest() {
        let bytes = header("llama", 15, 8192, 30, &[&[576, 49152], &[576]]);
        let info = parse(&mut bytes.as_slice()).unwrap();
        assert_eq!(
            info,
            GgufInfo {
                architecture: "llama".into(),
                parameters: 576 * 49152 + 576,
                quantization: "Q4_K_M".into(),
                context_length: 8192,
                layers: 30,
                embedding_length: 0,
                head_count: 0,
                head_count_kv: 0,
                key_length: 0,
                value_length: 0,
                vocab_size: 2,
                layer_bytes: 0,
                output_bytes: 0,
                // The 2-D Q4_0 matrix (rows in groups of 8), once more.
                repacked_bytes: 576 * 49152 / 32 * 18,
            }
        );
    }

    /// SmolLM2-135M's shape: 30 layers, 576 wide, 9 query heads, 3 KV heads of 64.
    fn smollm2() -> GgufInfo {
        GgufInfo {
            architecture: "llama".into(),
            parameters: 134_515_008,
            quantization: "Q4_1".into(),
            context_length: 8192,
            layers: 30,
            embedding_length: 576,
            head_count: 9,
            head_count_kv: 3,
            key_length: 64,
            value_length: 64,
            vocab_size: 49152,
            layer_bytes: 0,
            output_bytes: 0,
            repacked_bytes: 0,
        }
    }

    #[test]
    fn the_kv_cache_grows_with_slots_and_context() {
        let info = smollm2();
        // 30 layers × 3 heads × (64 + 64) × 2 bytes = 23,040 bytes per token.
        let one = estimate(&info, 100 << 20, 1, 4096, F16S);
        assert_eq!(one.kv_cache, 4096 * 23_040);
        let four = estimate(&info, 100 << 20, 4, 4096, F16S);
        assert_eq!(four.kv_cache, 4 * one.kv_cache);
        assert_eq!(four.weights, 100 << 20);
        assert!(four.total() > four.weights + four.kv_cache);
    }

    #[test]
    fn matrices_llama_cpp_repacks_are_counted_again() {
        // A Q4_0 matrix of 2048 × 8192: 16,777,216 elements, 18 bytes a block of 32.
        let q4_0 = repacked(2, &[2048, 8192], Part::Layer);
        assert_eq!(q4_0, 16_777_216 / 32 * 18);
        assert_eq!(
            repacked(12, &[4096, 4096], Part::Output),
            4096 * 4096 / 256 * 144
        );
        // Embeddings are read by row; rows not in groups of 8, Q4_1 and F16 stay as they are.
        assert_eq!(repacked(2, &[2048, 8192], Part::TokenEmbeddings), 0);
        assert_eq!(repacked(2, &[2048, 8193], Part::Layer), 0);
        assert_eq!(repacked(3, &[2048, 8192], Part::Layer), 0);
        assert_eq!(repacked(1, &[2048, 8192], Part::Layer), 0);
        let info = GgufInfo {
            repacked_bytes: q4_0,
            ..smollm2()
        };
        let est = estimate(&info, 100 << 20, 1, 4096, F16S);
        let on_cpu = if crate::GPU_BACKEND { 0 } else { q4_0 };
        assert_eq!(est.weights, (100 << 20) + on_cpu);
    }

    /// f16 K and V cells: llama.cpp's default.
    const F16S: (CacheType, CacheType) = (CacheType::F16, CacheType::F16);

    #[test]
    fn a_quantized_kv_cache_takes_its_blocks_bytes() {
        let info = smollm2();
        let f16 = estimate(&info, 100 << 20, 4, 4096, F16S).kv_cache;
        let q8 = estimate(
            &info,
            100 << 20,
            4,
            4096,
            (CacheType::Q8_0, CacheType::Q8_0),
        )
        .kv_cache;
        let q4 = estimate(
            &info,
            100 << 20,
            4,
            4096,
            (CacheType::Q4_0, CacheType::Q4_0),
        )
        .kv_cache;
        // 34 and 18 bytes a block of 32 cells against f16's 64.
        assert_eq!(q8 * 64, f16 * 34);
        assert_eq!(q4 * 64, f16 * 18);
        let mixed = estimate(&info, 100 << 20, 4, 4096, (CacheType::Q8_0, CacheType::F16)).kv_cache;
        assert_eq!(mixed, (q8 + f16) / 2);
    }

    #[test]
    fn layer_and_output_sizes_come_from_the_distance_between_offsets() {
        let mut offsets = vec![
            (96, Part::Layer),
            (0, Part::TokenEmbeddings),
            (64, Part::Layer),
            (160, Part::Other),
        ];
        // Embeddings 0..64, layers 64..96 and 96..160, a norm 160..170.
        assert_eq!(part_sizes(&mut offsets, Some(170)), (96, 64));
        offsets.push((170, Part::Output));
        assert_eq!(part_sizes(&mut offsets, Some(200)), (96, 30));
    }

    #[test]
    fn a_split_divides_layers_and_keeps_the_rest_on_the_worker() {
        let info = GgufInfo {
            layer_bytes: 60 << 20,
            output_bytes: 20 << 20,
            ..smollm2()
        };
        let cost = split_cost(&info, 100 << 20, 4, 4096, F16S).unwrap();
        let whole = estimate(&info, 100 << 20, 4, 4096, F16S);
        assert_eq!(cost.per_layer, ((60 << 20) + whole.kv_cache).div_ceil(30));
        assert_eq!(cost.host, (40 << 20) + whole.compute + whole.margin);
        // The worker's share and the layers add up to the whole model on one
        // machine (to the byte per layer rounded up); a split costs on top the
        // output layer again (tied to the embeddings here, with its logits) and
        // each lender's compute buffer.
        let shares = cost.host + 30 * cost.per_layer;
        assert!(shares >= whole.total() && shares < whole.total() + 30);
        assert_eq!(cost.output, (20 << 20) + 49152 * BATCH_TOKENS * 4);
        assert_eq!(split_cost(&smollm2(), 100 << 20, 4, 4096, F16S), None);
    }

    #[test]
    fn refuses_what_is_not_gguf_or_is_cut_short() {
        assert!(parse(&mut &b"PK\x03\x04 a zip"[..]).is_err());
        let bytes = header("llama", 3, 2048, 2, &[&[4, 4]]);
        assert!(parse(&mut &bytes[..bytes.len() - 3]).is_err());
    }
}
