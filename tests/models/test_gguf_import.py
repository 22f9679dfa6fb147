"""GGUF import: write a tiny llama GGUF with the `gguf` package, import it, compare with what was written."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from tokenizers.pre_tokenizers import ByteLevel
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from rlhflab.errors import UserError
from rlhflab.models.gguf_import import import_gguf

gguf = pytest.importorskip("gguf")

# A byte-level BPE vocabulary (tokenizer.ggml.model = "gpt2"): one control token, the 256 byte symbols,
# then merges that spell "hello" and " world" ("Ġ" is the byte-level symbol for a space).
MERGES = [
    ("h", "e"),
    ("l", "l"),
    ("he", "ll"),
    ("hell", "o"),
    ("Ġ", "w"),
    ("o", "r"),
    ("Ġw", "or"),
    ("l", "d"),
    ("Ġwor", "ld"),
]
TOKENS = ["<|endoftext|>", *sorted(ByteLevel.alphabet()), *("".join(m) for m in MERGES)]


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf reorders q/k rows from HF's rotate-half layout to interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tiny_llama(hidden: int, tied: bool) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(TOKENS),
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tied,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # HF inits norms to ones; random values make a layer mix-up visible
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _write_gguf(path, model: LlamaForCausalLM, qtype=None) -> dict[str, np.ndarray]:
    """Write `model` as llama.cpp would; return the HF-layout weights a reader should get back."""
    cfg = model.config
    sd = {k: v.numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-test")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(TOKENS)
    w.add_token_types([3] + [1] * (len(TOKENS) - 1))  # 3 = control, 1 = normal
    w.add_token_merges([" ".join(m) for m in MERGES])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    expected = {}

    def add(gguf_name: str, hf_name: str, permute_heads: int | None = None):
        data = sd[hf_name] if permute_heads is None else _llama_cpp_permute(sd[hf_name], permute_heads)
        if qtype is not None and data.ndim == 2:
            packed = gguf.quants.quantize(data, qtype)
            w.add_tensor(gguf_name, packed, raw_shape=packed.shape, raw_dtype=qtype)
            data = gguf.quants.dequantize(packed, qtype)
        else:
            w.add_tensor(gguf_name, data)
        # what the reader must return: the stored values, with the q/k permutation undone
        expected[hf_name] = (
            sd[hf_name]
            if qtype is None or data.ndim != 2
            else (data if permute_heads is None else _undo_permute(data, permute_heads))
        )

    add("token_embd.weight", "model.embed_tokens.weight")
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", p + "input_layernorm.weight")
        add(f"blk.{i}.attn_q.weight", p + "self_attn.q_proj.weight", cfg.num_attention_heads)
        add(f"blk.{i}.attn_k.weight", p + "self_attn.k_proj.weight", cfg.num_key_value_heads)
        add(f"blk.{i}.attn_v.weight", p + "self_attn.v_proj.weight")
        add(f"blk.{i}.attn_output.weight", p + "self_attn.o_proj.weight")
        add(f"blk.{i}.ffn_norm.weight", p + "post_attention_layernorm.weight")
        add(f"blk.{i}.ffn_gate.weight", p + "mlp.gate_proj.weight")
        add(f"blk.{i}.ffn_up.weight", p + "mlp.up_proj.weight")
        add(f"blk.{i}.ffn_down.weight", p + "mlp.down_proj.weight")
    add("output_norm.weight", "model.norm.weight")
    if not cfg.tie_word_embeddings:  # llama.cpp writes output.weight only for an untied head
        add("output.weight", "lm_head.weight")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def _undo_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_permutation_helpers_are_inverse_and_not_identity():
    w = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    assert np.array_equal(_undo_permute(_llama_cpp_permute(w, 2), 2), w)
    assert not np.array_equal(_llama_cpp_permute(w, 2), w)


def test_import_float32_gguf_round_trip(tmp_path):
    model = _tiny_llama(hidden=16, tied=False)
    expected = _write_gguf(tmp_path / "tiny.gguf", model)
    out = import_gguf(tmp_path / "tiny.gguf", tmp_path / "hf")

    plain = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    assert type(plain).__name__ == "LlamaForCausalLM"
    assert getattr(plain.config, "quantization_config", None) is None
    assert plain.config.num_key_value_heads == 1 and not plain.config.tie_word_embeddings
    state = plain.state_dict()
    for name, value in expected.items():
        assert np.array_equal(state[name].numpy(), value), name  # float32 is stored exactly
    ids = torch.tensor([[5, 70, 120, 3, 260, 265]])
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, model(ids).logits)

    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    hello, world = TOKENS.index("hello"), TOKENS.index("Ġworld")
    assert tok("hello world")["input_ids"] == [hello, world]
    assert tok("hell")["input_ids"] == [TOKENS.index("hell")]
    assert tok.decode([hello, world]) == "hello world"
    assert tok.eos_token == "<|endoftext|>"
    assert tok("hello<|endoftext|>")["input_ids"] == [hello, 0]  # control token stays whole


def test_import_quantized_tied_gguf(tmp_path):
    """Q8_0 blocks are dequantized on import; the tied head comes back tied."""
    model = _tiny_llama(hidden=32, tied=True)
    expected = _write_gguf(tmp_path / "q8.gguf", model, qtype=gguf.GGMLQuantizationType.Q8_0)
    out = import_gguf(tmp_path / "q8.gguf", tmp_path / "hf")
    plain = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    assert plain.config.tie_word_embeddings
    assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()
    state = plain.state_dict()
    for name, value in expected.items():
        np.testing.assert_allclose(state[name].numpy(), value, atol=1e-6, rtol=0, err_msg=name)
    # quantization error stays small against the original float weights
    q = state["model.layers.0.self_attn.q_proj.weight"]
    assert (q - model.model.layers[0].self_attn.q_proj.weight).abs().max() < 0.01


def test_import_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="does not exist"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(UserError, match="not a GGUF file"):
        import_gguf(bad, tmp_path / "out")
    with pytest.raises(UserError, match="directory"):
        import_gguf(tmp_path, tmp_path / "out")
    good = tmp_path / "tiny.gguf"
    _write_gguf(good, _tiny_llama(hidden=16, tied=True))
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    with pytest.raises(UserError, match="pip install gguf"):
        import_gguf(good, tmp_path / "out")
    monkeypatch.undo()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="already exists"):
        import_gguf(good, tmp_path / "taken")
    assert not (tmp_path / "out").exists()
