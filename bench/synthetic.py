#!/usr/bin/env python3
"""Synthetic GGUF models: the shapes of real architectures, random weights.

What it is for: benchmarking rbee (and llama-server) on the shapes of models
that are too big to download for a bench run. How fast llama.cpp decodes
depends on the model's shape and tensor types, not on the values of its
weights, and the bench runs ignore EOS, so a file with the hyperparameters of
Llama-3.1-8B and random weights decodes exactly as fast as the real one. The
text it writes is garbage, and that is expected.

Each file has:
  - the tokenizer of the repository's test model (SmolLM2-135M-Instruct: BPE
    "gpt2", 49152 tokens, its merges, special ids and chat template), so
    prompts tokenize as usual and chat templates render. The vocabulary is
    therefore 49152 whatever the real architecture's is.
  - the real architecture's hyperparameters and tensors (as llama.cpp's
    loader wants them: llama-model.cpp, models/<arch>.cpp), norms of ones,
    llama3 RoPE factors where the real model has them.
  - random quantized weights (|w| ~ 0.02), deterministic by seed: the same
    shape, type and seed give a byte-identical file.
  - the key `rbee.synthetic` ("<shape> <type> seed=<seed> v<version>"): a file
    that already carries the one asked for is not written again, so
    `make bench` can call this script every time at no cost.

The output matrix (or the tied token embeddings) is stored as llama-quantize
stores it for Q4_0 and Q4_K: Q6_K (Q8_0 where a row is not a multiple of 256).
Q4_K here means every other matrix in Q4_K (file type Q4_K_S), with
llama-quantize's fallback to Q5_0 for rows not a multiple of 256.

Quantized weights are not quantized from floats: gguf-py's
gguf.quants.quantize handles Q4_0/Q5_0/Q8_0 but not Q4_K or Q6_K (it only
dequantizes those), and going through floats would take minutes per GB on
two cores. Instead each block is written directly: random codes and a fixed
scale of random sign, which dequantize to values of mean 0 and standard
deviation 0.02. Tensors are generated and written one at a time: the 8B at
Q4_0 (4.2 GB, smaller than the real 4.7 GB for its 49152-token vocabulary)
takes about 20 s on two cores and under 300 MB of memory.

Run (needs numpy and gguf from PyPI; `python3 -m pip install --target
.models/py gguf numpy` puts them where this script looks):

  python3 bench/synthetic.py --list
  python3 bench/synthetic.py llama-3.1-8b --type Q4_0 --seed 0
  python3 bench/synthetic.py qwen2.5-1.5b --type Q8_0 --out /tmp/q.gguf

The default output is .models/synthetic/<shape>-<type>.gguf; the path
written is printed on stdout (progress goes to stderr).
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_MODEL = ROOT / ".models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
GENERATOR_VERSION = 1  # bump when the bytes written for a (shape, type, seed) change
WEIGHT_STD = 0.02

try:
    import numpy as np
    import gguf
except ImportError:  # the place the brief installs them to, git-ignored
    sys.path.insert(0, str(ROOT / ".models" / "py"))
    try:
        import numpy as np
        import gguf
    except ImportError:
        sys.exit("error: needs numpy and gguf: python3 -m pip install --target .models/py gguf numpy")

Q = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class Shape:
    arch: str            # general.architecture, as llama.cpp names it
    about: str           # the real model these are the hyperparameters of
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int            # the FFN's width; for a MoE, each expert's
    head_dim: int = 0    # 0: n_embd // n_head
    rope_base: float = 10000.0
    rms_eps: float = 1e-5
    n_ctx: int = 4096    # the context the model was trained for
    tied: bool = True    # the output matrix is the token embeddings
    qkv_bias: bool = False
    n_expert: int = 0
    n_expert_used: int = 0
    llama3_rope: tuple[float, float, float, int] | None = None  # factor, low/high freq factor, original context

    @property
    def head(self) -> int:
        return self.head_dim or self.n_embd // self.n_head


SHAPES: dict[str, Shape] = {
    "smollm2-135m": Shape("llama", "SmolLM2-135M (the test model's twin)",
                          n_embd=576, n_layer=30, n_head=9, n_head_kv=3, n_ff=1536,
                          rope_base=1e5, n_ctx=8192),
    "llama-3.2-1b": Shape("llama", "Llama-3.2-1B",
                          n_embd=2048, n_layer=16, n_head=32, n_head_kv=8, n_ff=8192,
                          rope_base=5e5, n_ctx=131072, llama3_rope=(32.0, 1.0, 4.0, 8192)),
    "llama-3.2-3b": Shape("llama", "Llama-3.2-3B",
                          n_embd=3072, n_layer=28, n_head=24, n_head_kv=8, n_ff=8192,
                          rope_base=5e5, n_ctx=131072, llama3_rope=(32.0, 1.0, 4.0, 8192)),
    "qwen2.5-1.5b": Shape("qwen2", "Qwen2.5-1.5B (Q/K/V biases)",
                          n_embd=1536, n_layer=28, n_head=12, n_head_kv=2, n_ff=8960,
                          rope_base=1e6, rms_eps=1e-6, n_ctx=32768, qkv_bias=True),
    "llama-3.1-8b": Shape("llama", "Llama-3.1-8B",
                          n_embd=4096, n_layer=32, n_head=32, n_head_kv=8, n_ff=14336,
                          rope_base=5e5, n_ctx=131072, tied=False, llama3_rope=(8.0, 1.0, 4.0, 8192)),
    "llama-8kv128": Shape("llama", "Llama-3.1-8B's layers and attention, 4 layers deep",
                          n_embd=4096, n_layer=4, n_head=32, n_head_kv=8, n_ff=14336,
                          rope_base=5e5, n_ctx=131072, tied=False, llama3_rope=(8.0, 1.0, 4.0, 8192)),
    "olmoe-mini": Shape("olmoe", "OLMoE-1B-7B scaled down: 8 experts, 2 used",
                        n_embd=1024, n_layer=8, n_head=8, n_head_kv=8, n_ff=2048,
                        n_ctx=4096, tied=False, n_expert=8, n_expert_used=2),
    "qwen3moe-mini": Shape("qwen3moe", "Qwen3-30B-A3B scaled down: 8 layers, 32 experts, 4 used",
                           n_embd=2048, n_layer=8, n_head=32, n_head_kv=4, n_ff=768, head_dim=128,
                           rope_base=1e6, rms_eps=1e-6, n_ctx=32768, tied=False,
                           n_expert=32, n_expert_used=4),
}


@dataclass(frozen=True)
class Block:
    """How to fill one block of a quantized type with random weights: random
    bytes throughout, then the f16 scale fields set to ±scale and the fixed
    fields to constants. `code_std` is the standard deviation of the integer
    code a scale multiplies, for codes drawn uniformly from their bytes."""
    scale_offsets: tuple[int, ...]
    fixed: tuple[tuple[int, bytes], ...]
    code_std: float


# value = d * (q - 8), q in 0..15
Q4_0_BLOCK = Block((0,), (), math.sqrt((16**2 - 1) / 12))
# value = d * (q - 16), q in 0..31 (4 high bits in qh, 4 low in qs)
Q5_0_BLOCK = Block((0,), (), math.sqrt((32**2 - 1) / 12))
# value = d * q, q an int8
Q8_0_BLOCK = Block((0,), (), math.sqrt((256**2 - 1) / 12))
# d, dmin, 12 bytes of 6-bit (scale, min) pairs, 128 bytes of nibbles: value =
# d*sc*q - dmin*m; sc = 2, m = 15 and dmin = d make it d * (2q - 15)
Q4_K_BLOCK = Block((0, 2), ((4, bytes([2] * 4 + [15] * 4 + [0xF2] * 4)),), 2 * math.sqrt((16**2 - 1) / 12))
# ql[128], qh[64], 16 int8 scales (all 1), d: value = d * (q - 32), q in 0..63
Q6_K_BLOCK = Block((208,), ((192, bytes([1] * 16)),), math.sqrt((64**2 - 1) / 12))

BLOCKS = {Q.Q4_0: Q4_0_BLOCK, Q.Q5_0: Q5_0_BLOCK, Q.Q8_0: Q8_0_BLOCK, Q.Q4_K: Q4_K_BLOCK, Q.Q6_K: Q6_K_BLOCK}

# --type: (the matrices' type, general.file_type)
TYPES = {
    "Q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    "Q4_K": (Q.Q4_K, gguf.LlamaFileType.MOSTLY_Q4_K_S),
    "Q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "F16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
}

# llama-quantize's fallbacks for rows its block does not divide (llama-quant.cpp)
FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q6_K: Q.Q8_0}


@dataclass(frozen=True)
class Tensor:
    name: str
    dims: tuple[int, ...]  # numpy order: the row (ggml's ne[0]) last
    kind: str              # matrix, output, router, norm, bias, rope


def tensor_plan(s: Shape, n_vocab: int) -> list[Tensor]:
    """The tensors llama.cpp's loader wants for this shape, in file order."""
    q_dim, kv_dim = s.n_head * s.head, s.n_head_kv * s.head
    ts = [Tensor("token_embd.weight", (n_vocab, s.n_embd), "output" if s.tied else "matrix")]
    if s.llama3_rope:
        ts.append(Tensor("rope_freqs.weight", (s.head // 2,), "rope"))
    for i in range(s.n_layer):
        b = f"blk.{i}."
        ts += [
            Tensor(b + "attn_norm.weight", (s.n_embd,), "norm"),
            Tensor(b + "attn_q.weight", (q_dim, s.n_embd), "matrix"),
            Tensor(b + "attn_k.weight", (kv_dim, s.n_embd), "matrix"),
            Tensor(b + "attn_v.weight", (kv_dim, s.n_embd), "matrix"),
        ]
        if s.qkv_bias:
            ts += [Tensor(b + "attn_q.bias", (q_dim,), "bias"),
                   Tensor(b + "attn_k.bias", (kv_dim,), "bias"),
                   Tensor(b + "attn_v.bias", (kv_dim,), "bias")]
        if s.arch == "olmoe":  # norms over the whole Q and K
            ts += [Tensor(b + "attn_q_norm.weight", (q_dim,), "norm"),
                   Tensor(b + "attn_k_norm.weight", (kv_dim,), "norm")]
        elif s.arch == "qwen3moe":  # per-head norms
            ts += [Tensor(b + "attn_q_norm.weight", (s.head,), "norm"),
                   Tensor(b + "attn_k_norm.weight", (s.head,), "norm")]
        ts += [
            Tensor(b + "attn_output.weight", (s.n_embd, q_dim), "matrix"),
            Tensor(b + "ffn_norm.weight", (s.n_embd,), "norm"),
        ]
        if s.n_expert:
            e = s.n_expert
            ts += [Tensor(b + "ffn_gate_inp.weight", (e, s.n_embd), "router"),
                   Tensor(b + "ffn_gate_exps.weight", (e, s.n_ff, s.n_embd), "matrix"),
                   Tensor(b + "ffn_up_exps.weight", (e, s.n_ff, s.n_embd), "matrix"),
                   Tensor(b + "ffn_down_exps.weight", (e, s.n_embd, s.n_ff), "matrix")]
        else:
            ts += [Tensor(b + "ffn_gate.weight", (s.n_ff, s.n_embd), "matrix"),
                   Tensor(b + "ffn_up.weight", (s.n_ff, s.n_embd), "matrix"),
                   Tensor(b + "ffn_down.weight", (s.n_embd, s.n_ff), "matrix")]
    ts.append(Tensor("output_norm.weight", (s.n_embd,), "norm"))
    if not s.tied:
        ts.append(Tensor("output.weight", (n_vocab, s.n_embd), "output"))
    return ts


def storage_type(t: Tensor, qtype: Q) -> Q:
    """The GGML type a tensor is stored in, as llama-quantize would choose it."""
    if t.kind in ("norm", "bias", "rope", "router"):
        return Q.F32
    want = qtype
    if t.kind == "output" and qtype in (Q.Q4_0, Q.Q4_K):
        want = Q.Q6_K
    row = t.dims[-1]
    while row % gguf.GGML_QUANT_SIZES[want][0]:
        want = FALLBACK.get(want, Q.F16)
    return want


def tensor_nbytes(t: Tensor, ttype: Q) -> int:
    block, size = gguf.GGML_QUANT_SIZES[ttype]
    return math.prod(t.dims) // block * size


def tensor_rng(seed: int, name: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def random_blocks(rng: np.random.Generator, n_blocks: int, ttype: Q) -> np.ndarray:
    """n_blocks blocks of type ttype, as uint8 rows, of random weights."""
    layout = BLOCKS[ttype]
    size = gguf.GGML_QUANT_SIZES[ttype][1]
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    scale = np.float16(WEIGHT_STD / layout.code_std)
    # each block's scale gets a random sign (a bit of its own first byte), so
    # that codes with a mean off zero (Q4_0's -8..7) do not bias the weights
    signed = np.where(raw[:, :1] & 1, scale, -scale).astype("<f2").view(np.uint8)
    for offset in layout.scale_offsets:
        raw[:, offset:offset + 2] = signed
    for offset, value in layout.fixed:
        raw[:, offset:offset + len(value)] = np.frombuffer(value, dtype=np.uint8)
    return raw


def llama3_rope_factors(s: Shape) -> np.ndarray:
    """rope_freqs.weight as convert_hf_to_gguf.py computes it for Llama 3.x."""
    factor, low_freq_factor, high_freq_factor, old_ctx = s.llama3_rope
    low_wavelen, high_wavelen = old_ctx / low_freq_factor, old_ctx / high_freq_factor
    out = []
    for i in range(0, s.head, 2):
        wavelen = 2 * math.pi * s.rope_base ** (i / s.head)
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def tensor_data(s: Shape, t: Tensor, ttype: Q, seed: int) -> np.ndarray:
    """The tensor's bytes, as the array GGUFWriter writes."""
    if t.kind == "norm":
        return np.ones(t.dims, dtype=np.float32)
    if t.kind == "rope":
        return llama3_rope_factors(s)
    rng = tensor_rng(seed, t.name)
    if ttype in (Q.F32, Q.F16):
        dtype = np.float32 if ttype == Q.F32 else np.float16
        return (rng.standard_normal(t.dims, dtype=np.float32) * np.float32(WEIGHT_STD)).astype(dtype)
    block = gguf.GGML_QUANT_SIZES[ttype][0]
    raw = random_blocks(rng, math.prod(t.dims) // block, ttype)
    return raw.reshape(gguf.quant_shape_to_byte_shape(t.dims, ttype))


def tokenizer_fields(path: Path) -> list[tuple[str, object, gguf.GGUFValueType, gguf.GGUFValueType | None]]:
    """Every tokenizer.* key of the model at path: (key, value, type, array item type)."""
    if not path.exists():
        sys.exit(f"error: {path} not found (the tokenizer comes from it): run `make model`")
    reader = gguf.GGUFReader(path)
    fields = []
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            fields.append((key, field.contents(), field.types[0], sub))
    return fields


def synthetic_tag(shape: str, type_name: str, seed: int) -> str:
    return f"{shape} {type_name} seed={seed} v{GENERATOR_VERSION}"


def existing_tag(path: Path) -> str | None:
    """The rbee.synthetic key of the file at path, if it is one this script
    wrote. It is the second key (after general.architecture), so only the
    start of the header is read; GGUFReader would parse the whole tokenizer."""
    def read(f, fmt):
        data = f.read(struct.calcsize(fmt))
        return struct.unpack(fmt, data)[0] if len(data) == struct.calcsize(fmt) else None

    def read_str(f):
        n = read(f, "<Q")
        return f.read(n).decode(errors="replace") if n is not None and n < 1 << 20 else None

    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF" or read(f, "<I") != 3:
                return None
            f.read(16)  # tensor and key counts
            for _ in range(2):
                key, vtype = read_str(f), read(f, "<I")
                if vtype != gguf.GGUFValueType.STRING:
                    return None
                value = read_str(f)
                if key == "rbee.synthetic":
                    return value
    except OSError:
        pass
    return None


def write_model(name: str, type_name: str, seed: int, out: Path, tokenizer: Path) -> None:
    s = SHAPES[name]
    qtype, file_type = TYPES[type_name]
    tok = tokenizer_fields(tokenizer)
    n_vocab = len(next(v for k, v, _, _ in tok if k == "tokenizer.ggml.tokens"))
    plan = [(t, storage_type(t, qtype)) for t in tensor_plan(s, n_vocab)]

    part = out.with_name(out.name + ".part")
    w = gguf.GGUFWriter(part, s.arch)
    w.add_string("rbee.synthetic", synthetic_tag(name, type_name, seed))  # second: see existing_tag
    w.add_name(f"synthetic {name} (random weights)")
    w.add_type("model")
    w.add_description(f"{s.about}: its shape with random weights, for benchmarks; bench/synthetic.py")
    w.add_context_length(s.n_ctx)
    w.add_embedding_length(s.n_embd)
    w.add_block_count(s.n_layer)
    w.add_feed_forward_length(s.n_ff)
    w.add_head_count(s.n_head)
    w.add_head_count_kv(s.n_head_kv)
    if s.head != s.n_embd // s.n_head:
        w.add_key_length(s.head)
        w.add_value_length(s.head)
    w.add_rope_dimension_count(s.head)
    w.add_rope_freq_base(s.rope_base)
    w.add_layer_norm_rms_eps(s.rms_eps)
    w.add_vocab_size(n_vocab)
    if s.n_expert:
        w.add_expert_count(s.n_expert)
        w.add_expert_used_count(s.n_expert_used)
        if s.arch == "qwen3moe":
            w.add_expert_feed_forward_length(s.n_ff)
    w.add_file_type(int(file_type))
    if qtype != Q.F16:
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value, vtype, sub in tok:
        w.add_key_value(key, value, vtype, sub)

    for t, ttype in plan:
        if ttype in (Q.F32, Q.F16):
            w.add_tensor_info(t.name, t.dims, np.dtype(np.float32 if ttype == Q.F32 else np.float16),
                              tensor_nbytes(t, ttype))
        else:
            w.add_tensor_info(t.name, gguf.quant_shape_to_byte_shape(t.dims, ttype), np.dtype(np.uint8),
                              tensor_nbytes(t, ttype), raw_dtype=ttype)

    out.parent.mkdir(parents=True, exist_ok=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    total = sum(tensor_nbytes(t, ttype) for t, ttype in plan)
    done, last = 0, 0.0
    for t, ttype in plan:  # one tensor in memory at a time
        w.write_tensor_data(tensor_data(s, t, ttype, seed))
        done += tensor_nbytes(t, ttype)
        if time.monotonic() - last > 2 or done == total:
            last = time.monotonic()
            print(f"\r  {done / 1e9:.2f} / {total / 1e9:.2f} GB", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    w.close()
    os.replace(part, out)


def summary(name: str, type_name: str, n_vocab: int = 49152) -> tuple[int, int]:
    """(parameters, approximate file bytes) of a shape at a type."""
    qtype = TYPES[type_name][0]
    plan = tensor_plan(SHAPES[name], n_vocab)
    params = sum(math.prod(t.dims) for t in plan)
    tokenizer_bytes = 1_700_000
    return params, tokenizer_bytes + sum(tensor_nbytes(t, storage_type(t, qtype)) for t in plan)


def list_shapes() -> None:
    print(f"{'shape':15} {'arch':9} {'params':>8}  " + "  ".join(f"{t:>8}" for t in TYPES) + "  about")
    for name, s in SHAPES.items():
        params = summary(name, "F16")[0]
        sizes = "  ".join(f"{summary(name, t)[1] / 1e9:7.2f}G" for t in TYPES)
        print(f"{name:15} {s.arch:9} {params / 1e9:7.2f}B  {sizes}  {s.about}")


def main() -> None:
    p = argparse.ArgumentParser(
        description="Write a GGUF model with a real architecture's shape and random weights (see the docstring).",
        epilog="Q4_K: gguf-py's gguf.quants cannot quantize to Q4_K or Q6_K (it only dequantizes them), so "
               "this script writes every type's blocks itself, from random codes; no float weights are quantized.")
    p.add_argument("shape", nargs="?", choices=list(SHAPES), help="the model shape (--list shows them)")
    p.add_argument("--type", default="Q4_0", choices=list(TYPES), help="the matrices' type (default Q4_0)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", type=Path, help="output file (default .models/synthetic/<shape>-<type>.gguf)")
    p.add_argument("--tokenizer-from", type=Path, default=TOKENIZER_MODEL,
                   help="the GGUF model whose tokenizer to copy (default: the test model)")
    p.add_argument("--force", action="store_true", help="write even if the file is already there")
    p.add_argument("--list", action="store_true", help="list the shapes, their parameters and file sizes")
    a = p.parse_args()
    if a.list:
        list_shapes()
        return
    if not a.shape:
        p.error("a shape is needed (or --list)")
    out = a.out or ROOT / ".models" / "synthetic" / f"{a.shape}-{a.type}.gguf"
    tag = synthetic_tag(a.shape, a.type, a.seed)
    if not a.force and out.exists() and existing_tag(out) == tag:
        print(f"{out}: already there ({tag})", file=sys.stderr)
    else:
        start = time.monotonic()
        print(f"writing {out} ({tag}, ~{summary(a.shape, a.type)[1] / 1e9:.2f} GB)", file=sys.stderr)
        write_model(a.shape, a.type, a.seed, out, a.tokenizer_from)
        print(f"wrote {out}: {out.stat().st_size / 1e9:.2f} GB in {time.monotonic() - start:.1f} s",
              file=sys.stderr)
    print(out)


if __name__ == "__main__":
    main()
