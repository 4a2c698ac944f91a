"""ChatGLM2/ChatGLM3 configuration: the keys of the releases' config.json, read as transformers config."""

from __future__ import annotations

from transformers import PretrainedConfig


class ChatGLMConfig(PretrainedConfig):
    model_type = "chatglm"
    # The release's names; transformers' generic code asks for the standard ones.
    attribute_map = {
        "num_hidden_layers": "num_layers",
        "vocab_size": "padded_vocab_size",
        "intermediate_size": "ffn_hidden_size",
        "num_key_value_heads": "multi_query_group_num",
        "rms_norm_eps": "layernorm_epsilon",
    }

    def __init__(
        self,
        num_layers: int = 28,
        padded_vocab_size: int = 65024,
        hidden_size: int = 4096,
        ffn_hidden_size: int = 13696,
        kv_channels: int = 128,
        num_attention_heads: int = 32,
        seq_length: int = 32768,
        hidden_dropout: float = 0.0,
        attention_dropout: float = 0.0,
        layernorm_epsilon: float = 1e-5,
        rmsnorm: bool = True,
        apply_residual_connection_post_layernorm: bool = False,
        post_layer_norm: bool = True,
        add_bias_linear: bool = False,
        add_qkv_bias: bool = True,
        multi_query_attention: bool = True,
        multi_query_group_num: int = 2,
        pre_seq_len: int | None = None,
        prefix_projection: bool = False,
        rope_ratio: float = 1.0,
        family: str = "chatglm2",
        use_cache: bool = True,
        eos_token_id: int = 2,
        pad_token_id: int = 0,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        # The release ships python files for trust_remote_code; we never import them.
        kwargs.pop("auto_map", None)
        self.num_layers = num_layers
        self.padded_vocab_size = padded_vocab_size
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.kv_channels = kv_channels
        self.num_attention_heads = num_attention_heads
        self.seq_length = seq_length
        self.hidden_dropout = hidden_dropout
        self.attention_dropout = attention_dropout
        self.layernorm_epsilon = layernorm_epsilon
        self.rmsnorm = rmsnorm
        self.apply_residual_connection_post_layernorm = apply_residual_connection_post_layernorm
        self.post_layer_norm = post_layer_norm
        self.add_bias_linear = add_bias_linear
        self.add_qkv_bias = add_qkv_bias
        self.multi_query_attention = multi_query_attention
        self.multi_query_group_num = multi_query_group_num
        self.pre_seq_len = pre_seq_len
        self.prefix_projection = prefix_projection
        # chatglm2-6b-32k: positions / rope_ratio; chatglm3-6b-32k: base * rope_ratio (modeling.rope_settings)
        self.rope_ratio = rope_ratio
        # "chatglm2" | "chatglm3": set by the loader from the directory (backend/families.py); saved with
        # our checkpoints so an adapter knows which family it was trained on
        self.family = family
        self.use_cache = use_cache
        super().__init__(
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def prefix_kv_size(self) -> int:
        """Width of one prefix token's encoding: a key and a value for every layer and group."""
        return self.num_layers * self.kv_channels * self.multi_query_group_num * 2


def read_config_file(path, fix: str) -> dict:
    """A config.json as a dict whose known keys hold the types ChatGLMConfig's parameters say (a list for the
    whole file, or ``"num_layers": "two"``, is one BackendError naming the file, the key and ``fix``)."""
    from .json_files import check_keys_fit, read_json_object

    values = read_json_object(path, fix)
    check_keys_fit(values, ChatGLMConfig.__init__, path, fix)
    return values
