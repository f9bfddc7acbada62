"""Which decoder families tools/hf_survey/survey.py runs and the config fields each needs to be
built tiny (over survey.COMMON). A key "family@variant" runs the family again with other fields.
"_config"/"_model" name other classes than transformers' auto mappings; "__drop__" removes a
COMMON field (a family without num_key_value_heads would keep it as a stray attribute)."""

# Covered by python/tests/test_hf_families.py (and kvrt's first target, Gemma 3).
TESTED = {"llama", "qwen2", "qwen3", "mistral", "phi3", "granite", "olmo2", "stablelm", "gpt_neox",
          "phi", "glm", "gemma", "cohere", "smollm3", "qwen3_moe", "exaone4", "gemma2", "olmo3",
          "gpt_oss", "gemma3_text", "gemma3", "deepseek_v2", "deepseek_v3", "minicpm3",
          "glm4_moe_lite", "qwen3_next", "gemma4_text", "mimo_v2_flash", "opt", "falcon",
          "falcon_h1"}
# Not decoders kvrt serves: encoder(-decoder)s, BERT-likes used as decoders, audio and vision
# models whose text part has its own entry.
NOT_DECODERS = {
    "bart", "bert", "bert-generation", "big_bird", "bigbird_pegasus", "blenderbot",
    "blenderbot-small", "camembert", "data2vec-text", "electra", "ernie", "marian", "mbart",
    "megatron-bert", "mvp", "pegasus", "plbart", "prophetnet", "rembert", "roberta",
    "roberta-prelayernorm", "roc_bert", "roformer", "trocr", "whisper", "xlm", "xlm-roberta",
    "xlm-roberta-xl", "xlnet", "xmod", "reformer", "musicgen", "musicgen_melody", "moshi", "git",
    "fuyu", "got_ocr2", "mllama", "moss_transcribe_diarize", "modernbert-decoder"}
# Multimodal wrappers of a text model that has its own entry (the fields below would reach only
# the wrapper's config: built at full size, they run out of memory or differ in rounding only).
WRAPPERS = {"gemma3n", "gemma4", "gemma4_unified", "qwen3_5", "qwen3_5_moe", "qwen4_exp",
            "dots3_note", "llama4"}
SKIP = TESTED | NOT_DECODERS | WRAPPERS

_L4 = {"num_hidden_layers": 4, "head_dim": 32}
_MLA = {"num_key_value_heads": 4, "kv_lora_rank": 32, "q_lora_rank": 48, "qk_rope_head_dim": 16,
        "qk_nope_head_dim": 32, "v_head_dim": 24}
FIELDS = {
    "afmoe": _L4, "cohere2": _L4, "cohere2_moe": _L4, "ergo": _L4, "exaone_moe": _L4,
    "lara_mini": _L4, "qwen3_5_text": _L4, "qwen3_5_moe_text": _L4, "qwen4_exp_text": _L4,
    "dory": {**_L4, "rope_parameters": None, "n_input_layers": 1, "n_recurrent_layers": 2,
             "n_output_layers": 1},
    "kolibri1": {"num_hidden_layers": 5, "head_dim": 32, "sliding_window": 64},
    "codegen": {"rotary_dim": 16}, "gptj": {"rotary_dim": 16},
    "helium": {"head_dim": 32}, "hunyuan_v1_dense": {"head_dim": 32},
    "hunyuan_v1_moe": {"head_dim": 32},
    "ministral": {"head_dim": 32, "layer_types": ["sliding_attention", "full_attention"],
                  "sliding_window": 64},
    "jetmoe": {"num_key_value_heads": 2, "num_experts_per_tok": 2, "kv_channels": 32},
    "dbrx": {"attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0},
             "ffn_config": {"ffn_hidden_size": 256, "moe_num_experts": 2, "moe_top_k": 1},
             "d_model": 128, "n_heads": 4, "n_layers": 2},
    "dots1": {"n_routed_experts": 2, "num_experts_per_tok": 1, "n_shared_experts": 1,
              "moe_intermediate_size": 64, "first_k_dense_replace": 1},
    "dots3_note_text": {"num_key_value_heads": 4},
    "emu3": {"_config": "Emu3TextConfig"},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]], "num_layers": 2,
                "window_size": 256},
    "gemma3n_text": {"num_hidden_layers": 10, "num_kv_shared_layers": 5, "head_dim": 32,
                     "sliding_window": 64, "vocab_size_per_layer_input": 258,
                     "hidden_size_per_layer_input": 16, "laurel_rank": 8,
                     "activation_sparsity_pattern": [0.0] * 10},
    "gemma4_unified_text": {"num_hidden_layers": 6},
    "llama4_text": {"num_hidden_layers": 4, "head_dim": 32, "attention_chunk_size": 64,
                    "num_local_experts": 2, "intermediate_size_mlp": 256},
    "jamba": {"num_hidden_layers": 2, "attn_layer_period": 2, "attn_layer_offset": 1,
              "expert_layer_period": 2, "expert_layer_offset": 1, "num_experts": 2},
    "bamba": {"attn_layer_indices": [1], "mamba_n_heads": 8, "mamba_d_state": 16,
              "mamba_chunk_size": 64},
    "granitemoehybrid": {"layer_types": ["mamba", "attention"], "mamba_n_heads": 8,
                         "mamba_d_state": 16, "mamba_chunk_size": 64, "num_local_experts": 2,
                         "num_experts_per_tok": 1},
    "bailing_hybrid": {"num_hidden_layers": 6, "head_dim": 32},
    "zamba": {"num_hidden_layers": 6, "attn_layer_period": 6, "attn_layer_offset": 4,
              "layers_block_type": None},
    "zamba2": {"num_hidden_layers": 2, "layers_block_type": ["mamba", "hybrid"],
               "mamba_d_state": 16, "n_mamba_heads": 8, "mamba_headdim": 32},
    "recurrent_gemma": {"num_hidden_layers": 3, "head_dim": 32, "attention_window_size": 64},
    "lfm3": {"num_hidden_layers": 3, "head_dim": 32},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1,
                 "num_experts": 2, "num_experts_per_tok": 1, "moe_intermediate_size": 64},
    "mamba2": {"num_heads": 8, "head_dim": 32},
    "inkling_text": {"num_hidden_layers": 6, "head_dim": 32},
    "inkling2_text": {"num_hidden_layers": 6, "head_dim": 32},
    "gpt_bigcode": {"num_key_value_heads": "__drop__"},
    "longcat_flash": _MLA, "sarvam_mla": _MLA, "youtu": _MLA, "kimi_linear": _MLA,
    # Variants of families that run above or in the tests.
    "falcon@alibi": {"num_key_value_heads": "__drop__", "alibi": True, "multi_query": False},
    "gpt2@layerscale": {"scale_attn_by_inverse_layer_idx": True},
    "gpt_bigcode@mha": {"num_key_value_heads": "__drop__", "multi_query": False},
    "mpt@cache": {"use_cache": True},
}
