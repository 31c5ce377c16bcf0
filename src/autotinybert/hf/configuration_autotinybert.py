"""Configuration of an AutoTinyBERT sub-model that stock BERT cannot represent.

Self-contained on purpose: this file is copied next to exported weights and loaded with
``trust_remote_code=True`` on machines where autotinybert is not installed. It may import
only torch and transformers.

The one addition to `BertConfig` is ``qkv_size``: the width of the query/key/value
projections (AutoTinyBERT's d_qkv), which may differ from ``hidden_size``. Each of the
``num_attention_heads`` heads has ``qkv_size / num_attention_heads`` dims.
"""

from transformers import BertConfig


class AutoTinyBertConfig(BertConfig):
    model_type = "autotinybert"

    def __init__(self, qkv_size=None, **kwargs):
        super().__init__(**kwargs)
        self.qkv_size = self.hidden_size if qkv_size is None else int(qkv_size)
        if self.qkv_size % self.num_attention_heads:
            raise ValueError(
                f"qkv_size {self.qkv_size} must be divisible by num_attention_heads {self.num_attention_heads}"
            )
