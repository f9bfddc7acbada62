"""A tiny random decoder for tests and smoke runs (no download, no weights to carry).

tiny_random() is also tools/record/models.py's "tiny-random": a 4-layer Gemma 3 (2 sliding-window + 2
global layers, 4 q heads, 1 kv head unless kv_heads says otherwise, head_dim 64) with seeded random
weights, and ByteTokenizer, a byte-level tokenizer.
Its logits carry no meaning; it exercises the plumbing.
"""

from __future__ import annotations


class ByteTokenizer:
    """Bytes + 2 (0 = pad, 1 = BOS): enough of the transformers tokenizer interface for
    kvrt.generate and the tests."""

    vocab_size = 258
    eos_token_id = 257
    pad_token_id = 0

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        import torch
        ids = ([1] if add_special_tokens else []) + [b + 2 for b in text.encode("utf-8")]

        class Enc:
            input_ids = torch.tensor([ids]) if return_tensors == "pt" else ids
        return Enc()

    def decode(self, ids, skip_special_tokens=False):
        return bytes(int(i) - 2 for i in ids if 2 <= int(i) < 258).decode("utf-8",
                                                                           errors="replace")


def tiny_random(seed: int = 0, kv_heads: int = 1):
    """A small Gemma 3 with random weights, in eval mode on the CPU (float32). kv_heads (1, 2 or
    4, dividing the 4 q heads): 2 lets tensor parallelism split the kv heads over two ranks."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    cfg = Gemma3TextConfig(
        vocab_size=ByteTokenizer.vocab_size, hidden_size=128, intermediate_size=256,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=64,
        query_pre_attn_scalar=64, sliding_window=64, max_position_embeddings=8192,
        layer_types=["sliding_attention", "full_attention", "sliding_attention",
                     "full_attention"], pad_token_id=0, bos_token_id=1, eos_token_id=257)
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(cfg)
    # Sharper attention than the default init gives, so that retrieval matters.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
    return model.eval()


# Query projections of transformers' attention modules, by the names families give them.
_Q_PROJECTIONS = ("q_proj", "q_b_proj", "qkv_proj", "query_key_value", "c_attn", "Wqkv", "qkv",
                  "query", "q_attn")


def sharpen(model, factor: float = 4.0) -> None:
    """Makes a random model's attention sharper than its init's, so that a cache that loses the
    old tokens shows in the logits: its query projections x factor, and learned attention sinks
    (gpt-oss's `sinks`, ~N(0, 0.02) at init: ~1/200 of a softmax over a short prompt) ~N(5, 1),
    large enough that a sink left out moves the logits. In place, seeded by torch's generator."""
    import torch
    with torch.no_grad():
        for m in model.modules():
            for name in _Q_PROJECTIONS:
                w = getattr(getattr(m, name, None), "weight", None)  # MLA's q_proj may be None
                if isinstance(w, torch.Tensor):
                    w.mul_(factor)
            if isinstance(getattr(m, "sinks", None), torch.Tensor):
                m.sinks.copy_(torch.randn(m.sinks.shape) + 5.0)
