"""A BERT encoder whose attention width (``qkv_size``) is independent of ``hidden_size``.

Self-contained on purpose: this file is copied next to exported weights and loaded with
``trust_remote_code=True`` on machines where autotinybert is not installed. It may import
only torch and transformers, and it mirrors `BertModel`'s module names
(``bert.encoder.layer.{i}.attention.self.query`` ...) so state dicts line up one to one.

Differences from `BertModel`: query/key/value map ``hidden_size -> qkv_size`` and the
attention output projection maps ``qkv_size -> hidden_size``; each head has
``qkv_size / num_attention_heads`` dims and scores are scaled by ``1/sqrt(head dims)``.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    MaskedLMOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
)

try:
    from .configuration_autotinybert import AutoTinyBertConfig
except ImportError:  # loaded as a top-level module (e.g. copied into a plain directory)
    from configuration_autotinybert import AutoTinyBertConfig


def additive_attention_mask(attention_mask, dtype):
    """(B, T) 1 = keep / 0 = pad  ->  (B, 1, 1, T) additive mask (0 or the dtype's minimum)."""
    mask = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - mask) * torch.finfo(dtype).min


class AutoTinyBertEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids=None):
        seq_len = input_ids.shape[1]
        # Computed, not a buffer: nothing to initialise or save, and ONNX sees a plain Range.
        position_ids = torch.arange(seq_len, device=input_ids.device)[None, :]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        embeddings = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(position_ids)
            + self.token_type_embeddings(token_type_ids)
        )
        return self.dropout(self.LayerNorm(embeddings))


class AutoTinyBertSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.qkv_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.qkv_size)
        self.key = nn.Linear(config.hidden_size, config.qkv_size)
        self.value = nn.Linear(config.hidden_size, config.qkv_size)
        self.dropout_prob = config.attention_probs_dropout_prob

    def _heads(self, x):
        batch, seq_len, _ = x.shape
        return x.view(batch, seq_len, self.num_attention_heads, self.attention_head_size).transpose(1, 2)

    def forward(self, hidden_states, additive_mask=None, output_attentions=False):
        query = self._heads(self.query(hidden_states))  # (B, H, T, d)
        key = self._heads(self.key(hidden_states))
        value = self._heads(self.value(hidden_states))
        probs = None
        if output_attentions:
            scores = query @ key.transpose(-1, -2) / math.sqrt(self.attention_head_size)  # (B, H, T, T)
            if additive_mask is not None:
                scores = scores + additive_mask
            probs = scores.softmax(dim=-1)
            context = F.dropout(probs, self.dropout_prob, self.training) @ value
        else:
            context = F.scaled_dot_product_attention(
                query, key, value, attn_mask=additive_mask,
                dropout_p=self.dropout_prob if self.training else 0.0,
            )
        batch, _, seq_len, _ = context.shape
        return context.transpose(1, 2).reshape(batch, seq_len, -1), probs  # (B, T, qkv_size)


class AutoTinyBertSelfOutput(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.qkv_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, context, residual):
        return self.LayerNorm(self.dropout(self.dense(context)) + residual)


class AutoTinyBertAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self = AutoTinyBertSelfAttention(config)
        self.output = AutoTinyBertSelfOutput(config)

    def forward(self, hidden_states, additive_mask=None, output_attentions=False):
        context, probs = self.self(hidden_states, additive_mask, output_attentions)
        return self.output(context, hidden_states), probs


class AutoTinyBertIntermediate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states):
        return self.intermediate_act_fn(self.dense(hidden_states))


class AutoTinyBertOutput(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, intermediate, residual):
        return self.LayerNorm(self.dropout(self.dense(intermediate)) + residual)


class AutoTinyBertLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attention = AutoTinyBertAttention(config)
        self.intermediate = AutoTinyBertIntermediate(config)
        self.output = AutoTinyBertOutput(config)

    def forward(self, hidden_states, additive_mask=None, output_attentions=False):
        attention_output, probs = self.attention(hidden_states, additive_mask, output_attentions)
        return self.output(self.intermediate(attention_output), attention_output), probs


class AutoTinyBertEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer = nn.ModuleList(AutoTinyBertLayer(config) for _ in range(config.num_hidden_layers))


class AutoTinyBertPooler(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states):
        return torch.tanh(self.dense(hidden_states[:, 0]))


class AutoTinyBertPredictionHeadTransform(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = ACT2FN[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states):
        return self.LayerNorm(self.transform_act_fn(self.dense(hidden_states)))


class AutoTinyBertLMPredictionHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.transform = AutoTinyBertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden_states):
        return self.decoder(self.transform(hidden_states))


class AutoTinyBertOnlyMLMHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.predictions = AutoTinyBertLMPredictionHead(config)

    def forward(self, sequence_output):
        return self.predictions(sequence_output)


class AutoTinyBertPreTrainedModel(PreTrainedModel):
    config_class = AutoTinyBertConfig
    base_model_prefix = "bert"

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, AutoTinyBertLMPredictionHead):
            with torch.no_grad():
                module.bias.zero_()


class AutoTinyBertModel(AutoTinyBertPreTrainedModel):
    def __init__(self, config, add_pooling_layer=True):
        super().__init__(config)
        self.embeddings = AutoTinyBertEmbeddings(config)
        self.encoder = AutoTinyBertEncoder(config)
        self.pooler = AutoTinyBertPooler(config) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None,
                output_hidden_states=False, output_attentions=False, return_dict=True, **unused):
        hidden_states = self.embeddings(input_ids, token_type_ids)
        additive_mask = None
        if attention_mask is not None:
            additive_mask = additive_attention_mask(attention_mask, hidden_states.dtype)
        all_hidden = [hidden_states] if output_hidden_states else None
        all_attentions = [] if output_attentions else None
        for layer in self.encoder.layer:
            hidden_states, probs = layer(hidden_states, additive_mask, output_attentions)
            if output_hidden_states:
                all_hidden.append(hidden_states)
            if output_attentions:
                all_attentions.append(probs)
        pooled = self.pooler(hidden_states) if self.pooler is not None else None
        output = BaseModelOutputWithPooling(
            last_hidden_state=hidden_states,
            pooler_output=pooled,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attentions) if output_attentions else None,
        )
        return output if return_dict else output.to_tuple()


class AutoTinyBertForMaskedLM(AutoTinyBertPreTrainedModel):
    _tied_weights_keys = {
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias",
    }

    def __init__(self, config):
        super().__init__(config)
        self.bert = AutoTinyBertModel(config, add_pooling_layer=False)
        self.cls = AutoTinyBertOnlyMLMHead(config)
        self.post_init()

    def get_output_embeddings(self):
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings):
        self.cls.predictions.decoder = new_embeddings
        self.cls.predictions.bias = new_embeddings.bias

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None,
                output_hidden_states=False, output_attentions=False, return_dict=True, **unused):
        outputs = self.bert(input_ids, attention_mask, token_type_ids, output_hidden_states, output_attentions)
        logits = self.cls(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)
        output = MaskedLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                attentions=outputs.attentions)
        return output if return_dict else output.to_tuple()


class AutoTinyBertForSequenceClassification(AutoTinyBertPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = AutoTinyBertModel(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None,
                output_hidden_states=False, output_attentions=False, return_dict=True, **unused):
        outputs = self.bert(input_ids, attention_mask, token_type_ids, output_hidden_states, output_attentions)
        logits = self.classifier(self.dropout(outputs.pooler_output))
        loss = None
        if labels is not None:
            if self.num_labels == 1:  # regression (STS-B), as BertForSequenceClassification does
                loss = F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
            else:
                loss = F.cross_entropy(logits, labels)
        output = SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                          attentions=outputs.attentions)
        return output if return_dict else output.to_tuple()


class AutoTinyBertForQuestionAnswering(AutoTinyBertPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = AutoTinyBertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, start_positions=None,
                end_positions=None, output_hidden_states=False, output_attentions=False, return_dict=True, **unused):
        outputs = self.bert(input_ids, attention_mask, token_type_ids, output_hidden_states, output_attentions)
        start_logits, end_logits = self.qa_outputs(outputs.last_hidden_state).unbind(dim=-1)
        loss = None
        if start_positions is not None and end_positions is not None:
            # Positions outside the sequence are ignored, as in BertForQuestionAnswering.
            ignored = start_logits.shape[1]
            start_positions = start_positions.clamp(0, ignored)
            end_positions = end_positions.clamp(0, ignored)
            loss = (F.cross_entropy(start_logits, start_positions, ignore_index=ignored)
                    + F.cross_entropy(end_logits, end_positions, ignore_index=ignored)) / 2
        output = QuestionAnsweringModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits,
                                              hidden_states=outputs.hidden_states, attentions=outputs.attentions)
        return output if return_dict else output.to_tuple()
