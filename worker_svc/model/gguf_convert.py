"""GGUF (llama architecture) -> a Hugging Face checkpoint directory, fp32 weights.

Dequantizes every tensor, maps llama.cpp names to Hugging Face names, undoes llama.cpp's
q/k row permutation, and rebuilds the tokenizer (byte-level BPE) and chat template from the
GGUF metadata. checkpoint.py decides when to run it and caches the result.

Beside the fp32 weights it keeps the GGUF's own blocks of the matrices quantized in a
type the C++ decode stack reads (Q4_0, Q4_1, Q8_0), under the same names and in the same
row order, in BLOCKS_FILE: at batch 1 a step streams every weight once, and the blocks
are 4.5-8.5 bits a weight instead of 32 (csrc/decode.cpp, "GGUF blocks").
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

_CONTROL_TOKEN = 3  # llama.cpp token_type: special, e.g. <|im_end|>
_USER_DEFINED_TOKEN = 4  # llama.cpp token_type: added but not special, matched whole in text

_SPECIAL_TOKEN_KEYS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
}

_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_TENSOR_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.weight")

# The file of GGUF blocks (a safetensors file, not named *.safetensors so that checkpoint
# loaders do not take its uint8 blocks for weights), and the ggml types kept there (the
# C++ stack's GgmlType).
BLOCKS_FILE = "ggml_blocks.st"
BLOCK_TYPES = frozenset({"Q4_0", "Q4_1", "Q8_0"})

# Values of `tokenizer.ggml.pre` whose split is llama.cpp's "each digit alone, then GPT-2's
# regex": the Hugging Face tokenizers of these models say Digits(individual) + ByteLevel.
_DIGIT_SPLIT_PRES = frozenset({"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"})
_GPT2_SPLIT_PRES = frozenset({"default", "gpt2", "mpt", "olmo", "jais"})

# A quantization suffix on a GGUF file name: "x.Q4_1", "x-Q4_K_M", "x.f16", "x-IQ2_XS", "x.bf16".
_QUANT_SUFFIX = re.compile(r"[.\-_](?:I?Q\d\w*|F16|F32|BF16)$", re.IGNORECASE)

def model_name_from_gguf(gguf_path: Path) -> str:
    """The file name less its quantization suffix: SmolLM2-135M-Instruct.Q4_1.gguf -> SmolLM2-135M-Instruct."""
    return _QUANT_SUFFIX.sub("", gguf_path.stem) or gguf_path.stem


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> None:
    """Write a Hugging Face checkpoint (fp32 weights) for a llama-architecture GGUF into out_dir."""
    from gguf import GGUFReader
    from safetensors.numpy import save_file

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = GGUFReader(gguf_path)
    meta = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    if meta.get("general.architecture") != "llama":
        raise ValueError(f"{gguf_path}: architecture {meta.get('general.architecture')!r} is not supported")

    tensors = _hf_tensors(reader, meta)
    config = _hf_config(meta, model_name_from_gguf(gguf_path), tie_word_embeddings="lm_head.weight" not in tensors)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    blocks, types = _hf_blocks(reader, meta)
    if blocks:
        save_file(blocks, str(out_dir / BLOCKS_FILE), metadata={"format": "ggml-blocks", **types})
    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / "generation_config.json", _generation_config(meta))
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config(meta))
    _build_tokenizer(meta).save(str(out_dir / "tokenizer.json"))


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _hf_config(meta: dict[str, Any], name: str, tie_word_embeddings: bool) -> dict[str, Any]:
    hidden_size = int(meta["llama.embedding_length"])
    num_heads = int(meta["llama.attention.head_count"])
    rope_theta = float(meta.get("llama.rope.freq_base", 10000.0))
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise ValueError(f"RoPE scaling {scaling!r} is not supported")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "bros_model_name": name,
        "hidden_size": hidden_size,
        "intermediate_size": int(meta["llama.feed_forward_length"]),
        "num_hidden_layers": int(meta["llama.block_count"]),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", num_heads)),
        "head_dim": int(meta.get("llama.attention.key_length", hidden_size // num_heads)),
        "hidden_act": "silu",
        "rms_norm_eps": float(meta["llama.attention.layer_norm_rms_epsilon"]),
        # transformers 5 reads rope_parameters; older readers read rope_theta.
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "max_position_embeddings": int(meta.get("llama.context_length", 2048)),
        "vocab_size": int(meta.get("llama.vocab_size", len(meta["tokenizer.ggml.tokens"]))),
        "tie_word_embeddings": tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "dtype": "float32",
        "torch_dtype": "float32",
    }


def _generation_config(meta: dict[str, Any]) -> dict[str, Any]:
    ids = {name: key for name, key in _SPECIAL_TOKEN_KEYS.items() if name != "unk" and key in meta}
    return {f"{name}_token_id": int(meta[key]) for name, key in ids.items()}


# ---------------------------------------------------------------- weights


def _hf_tensors(reader, meta: dict[str, Any]) -> dict[str, np.ndarray]:
    """Every tensor dequantized to fp32 under its Hugging Face name, Q and K rows un-permuted."""
    from gguf.quants import dequantize

    tensors = {}
    for t in reader.tensors:
        # gguf lists dims fastest-first (ggml's ne0, ne1, ...); numpy wants them reversed.
        weights = dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(d) for d in t.shape])))
        tensors[_hf_tensor_name(t.name)] = np.ascontiguousarray(_hf_rows(t.name, weights, meta), dtype=np.float32)
    return tensors


def _hf_blocks(reader, meta: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The GGUF's blocks of every matrix quantized in a BLOCK_TYPES type, [rows, bytes]
    uint8 under its Hugging Face name, Q and K rows un-permuted as the fp32 weights; and
    each one's ggml type number (as a string: safetensors metadata)."""
    blocks, types = {}, {}
    for t in reader.tensors:
        if t.tensor_type.name not in BLOCK_TYPES or len(t.shape) != 2:
            continue
        rows = np.asarray(t.data, dtype=np.uint8).reshape(int(t.shape[1]), -1)
        name = _hf_tensor_name(t.name)
        blocks[name] = np.ascontiguousarray(_hf_rows(t.name, rows, meta))
        types[name] = str(int(t.tensor_type))
    return blocks, types


def _hf_rows(gguf_name: str, rows: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    """A tensor's rows (weights or blocks) in Hugging Face order: Q and K un-permuted."""
    num_heads = int(meta["llama.attention.head_count"])
    if ".attn_q." in gguf_name:
        return _unpermute_rope_rows(rows, num_heads)
    if ".attn_k." in gguf_name:
        return _unpermute_rope_rows(rows, int(meta.get("llama.attention.head_count_kv", num_heads)))
    return rows


def _hf_tensor_name(gguf_name: str) -> str:
    stem, _, suffix = gguf_name.rpartition(".")
    if suffix == "weight" and stem in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[stem]}.weight"
    match = _LAYER_TENSOR_NAME.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_TENSORS:
        return f"model.layers.{match.group(1)}.{_LAYER_TENSORS[match.group(2)]}.weight"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face Llama counterpart")


def _unpermute_rope_rows(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of Q/K rows, back to Hugging Face's rotate-half RoPE layout.

    Per head, Hugging Face rotates dim j with dim j + D/2; llama.cpp rotates adjacent pairs
    (2j, 2j+1), so its converter interleaved the two halves. Row r = 2j + s of a GGUF head
    is row s * D/2 + j of the Hugging Face head:
        GGUF  [heads, D/2, 2, in]  --swap(1, 2)-->  HF [heads, 2, D/2, in]
    """
    rows = weights.shape[0]
    half = rows // num_heads // 2
    return weights.reshape(num_heads, half, 2, -1).swapaxes(1, 2).reshape(weights.shape)


# ---------------------------------------------------------------- tokenizer


def _build_tokenizer(meta: dict[str, Any]):
    """A byte-level BPE `tokenizers.Tokenizer` from the GGUF's vocab, merges and token types."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"tokenizer model {meta.get('tokenizer.ggml.model')!r} is not supported (only gpt2 BPE)")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    bpe = models.BPE(vocab={tok: i for i, tok in enumerate(tokens)}, merges=merges, fuse_unk=False)
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
    tokenizer.decoder = decoders.ByteLevel()

    types = list(meta.get("tokenizer.ggml.token_type", []))
    # Added tokens are matched whole before BPE; without this <|im_end|> would be cut into pieces.
    control = [tok for tok, ty in zip(tokens, types) if ty == _CONTROL_TOKEN]
    user_defined = [tok for tok, ty in zip(tokens, types) if ty == _USER_DEFINED_TOKEN]
    tokenizer.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok in control])
    tokenizer.add_tokens([AddedToken(tok, special=False, normalized=False) for tok in user_defined])
    return tokenizer


def _pre_tokenizer(pre: str):
    """The Hugging Face pre-tokenizer that splits text as llama.cpp does for `tokenizer.ggml.pre`."""
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in _DIGIT_SPLIT_PRES:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _GPT2_SPLIT_PRES:
        return byte_level
    raise ValueError(f"pre-tokenizer {pre!r} is not supported")


def _tokenizer_config(meta: dict[str, Any]) -> dict[str, Any]:
    tokens = meta["tokenizer.ggml.tokens"]
    config: dict[str, Any] = {
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "model_max_length": int(meta.get("llama.context_length", 2048)),
        "clean_up_tokenization_spaces": False,
    }
    for name, gguf_key in _SPECIAL_TOKEN_KEYS.items():
        if gguf_key in meta:
            config[f"{name}_token"] = tokens[int(meta[gguf_key])]
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return config
