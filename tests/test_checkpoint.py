"""GGUF -> Hugging Face checkpoint and the tokenizer, checked against transformers' own GGUF loader
on the real default model (SmolLM2-135M-Instruct, Q4_1)."""
import time

import numpy as np
import pytest
import torch

from worker_svc.model.checkpoint import default_gguf_path, load_state_dict, resolve_model
from worker_svc.model.gguf_convert import _unpermute_rope_rows
from worker_svc.model.config import ModelConfig
from worker_svc.model.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

CHECKPOINT_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "ggml_blocks.st",           # the GGUF's quantized blocks, for the C++ decode stack
    "tokenizer.json",
    "tokenizer_config.json",
}

TEXTS = [
    "Hello, world!",
    "12345",
    "The year 2024 had 366 days.",
    "  two leading spaces",
    "line one\nline two\n\n\tindented",
    "naïve café — “quotes” 日本語のテキスト",
    "emoji 🦀🚀👩\u200d👩\u200d👧 done",
    "def f(x):\n    return x ** 2  # square\n",
    "<|im_start|>user\nhi<|im_end|>",
    "don't I'll we've",
    "",
]

CONVERSATIONS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hi 👋, write a haiku."}],
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bros-models")


@pytest.fixture(scope="session")
def model_dir(cache_dir):
    return resolve_model(None, cache_dir)


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    return Tokenizer(model_dir)


@pytest.fixture(scope="session")
def reference_model():
    """transformers' own GGUF loader: slow (~30 s), so once per session."""
    gguf = default_gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def reference_tokenizer():
    gguf = default_gguf_path()
    return transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


# ---------------------------------------------------------------- weights and config


def test_state_dict_matches_transformers_gguf_loader(model_dir, reference_model):
    ours = load_state_dict(model_dir)
    reference = reference_model.state_dict()
    # Tied embeddings: transformers lists lm_head as an alias of embed_tokens; the file stores it once.
    assert set(ours) == set(reference) - {"lm_head.weight"}
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, reference[name]), name


def test_logits_match_transformers_gguf_loader(model_dir, tokenizer, reference_model):
    ours = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = [tokenizer.encode("The capital of France is"), tokenizer.apply_chat_template(CONVERSATIONS[0])]
    with torch.no_grad():
        for ids in prompts:
            input_ids = torch.tensor([ids])
            diff = (ours(input_ids).logits - reference_model(input_ids).logits).abs().max().item()
            assert diff < 1e-4, diff


def test_unpermute_inverts_llama_cpp_rope_permutation():
    num_heads, head_dim, in_features = 3, 8, 5
    hf = np.arange(num_heads * head_dim * in_features, dtype=np.float32).reshape(num_heads * head_dim, in_features)
    # llama.cpp's converter: per head, interleave the two rotate-half halves.
    gguf = hf.reshape(num_heads, 2, head_dim // 2, in_features).swapaxes(1, 2).reshape(hf.shape)
    np.testing.assert_array_equal(_unpermute_rope_rows(gguf, num_heads), hf)


def test_config_reads_as_model_config(model_dir):
    cfg = ModelConfig.from_hf_dir(model_dir)
    assert cfg.name == "SmolLM2-135M-Instruct"
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 576, 9, 3, 64)
    assert (cfg.vocab_size, cfg.max_position_embeddings, cfg.rope_theta) == (49152, 8192, 100000.0)
    assert cfg.tie_word_embeddings and cfg.eos_token_ids == (2,) and cfg.bos_token_id == 1


# ---------------------------------------------------------------- cache


def test_second_resolve_hits_complete_cache(model_dir, cache_dir):
    start = time.perf_counter()
    again = resolve_model(str(default_gguf_path()), cache_dir)
    assert time.perf_counter() - start < 2.0
    assert again == model_dir
    assert {p.name for p in model_dir.iterdir()} == CHECKPOINT_FILES
    assert [p.name for p in cache_dir.iterdir()] == [model_dir.name]  # no staging leftovers


def test_failed_conversion_leaves_no_cache_entry(tmp_path):
    broken = tmp_path / "broken.Q4_1.gguf"
    broken.write_bytes(b"GGUF" + bytes(60))
    cache = tmp_path / "cache"
    with pytest.raises(ValueError):  # gguf's reader rejects the header
        resolve_model(str(broken), cache)
    assert list(cache.iterdir()) == []


def test_resolve_returns_checkpoint_dir_as_is(model_dir, tmp_path):
    assert resolve_model(str(model_dir)) == model_dir
    with pytest.raises(FileNotFoundError):
        resolve_model(str(tmp_path))  # a directory without config.json


# ---------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tokenizer, reference_tokenizer, text):
    ids = tokenizer.encode(text)
    assert ids == reference_tokenizer.encode(text)
    assert tokenizer.decode(ids) == reference_tokenizer.decode(ids) == text


@pytest.mark.parametrize(
    "text, pieces",
    [
        ("x  9", ["x", "ĠĠ", "9"]),
        ("a\n\n1. item", ["a", "ĊĊ", "1", ".", "Ġitem"]),
    ],
)
def test_digits_split_like_llama_cpp_smollm(tokenizer, reference_tokenizer, text, pieces):
    """llama.cpp's "smollm" split isolates each digit first, so whitespace before a digit stays
    one piece. transformers' GGUF tokenizer (5.23) skips that step and splits it, here only."""
    assert [reference_tokenizer.convert_ids_to_tokens(i) for i in tokenizer.encode(text)] == pieces


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_matches_transformers(tokenizer, reference_tokenizer, messages):
    expected = reference_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert tokenizer.apply_chat_template(messages) == expected
    assert tokenizer.decode(expected).endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_special_ids(tokenizer):
    assert tokenizer.vocab_size == 49152
    assert tokenizer.eos_token_ids == (2,)
    assert tokenizer.decode([2]) == "<|im_end|>"


MULTIBYTE_TEXTS = [
    "naïve café — “quotes”",
    "日本語のテキスト 🦀🚀👩\u200d👩\u200d👧!",
    "é" * 7 + "🙂 end",
]


@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
def test_incremental_detokenizer_deltas_concatenate_to_decode(tokenizer, text):
    ids = tokenizer.encode(text)
    detok = tokenizer.incremental_detokenizer()
    deltas = [detok.push(i) for i in ids]
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert detok.flush() == ""
    assert not any("\ufffd" in d for d in deltas)


def test_incremental_detokenizer_holds_back_then_flushes_an_incomplete_tail(tokenizer):
    ids = tokenizer.encode("🦀")  # byte-level pieces: no single token is a whole character
    detok = tokenizer.incremental_detokenizer()
    assert [detok.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.flush() == tokenizer.decode(ids[:-1])


def test_blocks_file_keeps_the_ggufs_blocks_of_the_fp32_weights(model_dir):
    """The converter keeps each Q4_1 / Q8_0 matrix's blocks, under its Hugging Face name and
    in its (un-permuted) row order: gguf-py dequantizes them to the fp32 weights exactly."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from worker_svc.model.checkpoint import load_blocks, load_state_dict

    blocks, state = load_blocks(model_dir), load_state_dict(model_dir)
    assert len(blocks) == 7 * 30 + 1
    assert blocks["model.embed_tokens.weight"][1] == GGMLQuantizationType.Q8_0
    assert {t for name, (_, t) in blocks.items() if ".layers." in name} == {GGMLQuantizationType.Q4_1}
    for name in ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.7.self_attn.k_proj.weight", "model.layers.29.mlp.down_proj.weight"]:
        data, ggml_type = blocks[name]
        weights = dequantize(data.numpy(), GGMLQuantizationType(ggml_type))
        assert torch.equal(torch.from_numpy(weights).reshape(state[name].shape), state[name]), name
