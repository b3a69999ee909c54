"""Sequence classification on the masked mean of an encoder's token states.

`BertForSequenceClassification` classifies BERT's pooler output: a dense layer and tanh
on the first ([CLS]) token. Sentence encoders such as all-MiniLM-L6-v2 were trained to be
read by averaging the token states instead, and their [CLS] state carries less of the
sentence: a non-private linear probe on Rotten Tomatoes reaches 0.746 on mean-pooled
MiniLM features against 0.711 on its pooler output (benchmarks/text_pooling_probe.py).
With DP training at epsilon = 8, the text recipe's pooler-output head stayed at the
majority class, while the mean-pooled one learned (docs/RESULTS.md).

The average runs over the tokens that `attention_mask` marks as real, so an example's
logits, and hence its per-example gradient, do not depend on how far the other examples
of its batch pad it. That matters for privacy: with padding in the average, adding one
long example to a batch would change every other example's gradient.

    from hf_dp_microadam import MeanPooledBertForSequenceClassification
    model = MeanPooledBertForSequenceClassification.from_pretrained("all-MiniLM-L6-v2-folder", num_labels=2)

A saved model reloads with the same class, and `hf_dp_microadam.assets.load_model` picks
it from the saved config (`classifier_pooling: "mean"`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BertForSequenceClassification, BertModel, BertPreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.utils.generic import can_return_tuple

CLASSIFIER_POOLING_KEY = "classifier_pooling"


def masked_mean(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Average `hidden_states` [n, T, d] over the positions where `attention_mask` [n, T] is 1.

    Without a mask every position counts. A row with no real token gives zeros.
    """
    if attention_mask is None:
        return hidden_states.mean(dim=1)
    weights = attention_mask.to(hidden_states.dtype).unsqueeze(-1)
    counts = weights.sum(dim=1).clamp(min=1.0)
    return (hidden_states * weights).sum(dim=1) / counts


class MeanPooledBertForSequenceClassification(BertForSequenceClassification):
    """A BERT encoder, the masked mean of its last hidden states, dropout and a linear classifier.

    Same configuration, weights layout (`bert.*`, `classifier.*`) and outputs as
    `BertForSequenceClassification`, except that there is no pooler. Loading skips the
    checkpoint's `bert.pooler.*` weights: the forward pass never reads them, and DP
    training needs a per-example gradient for every trainable parameter.
    `config.classifier_pooling` is set to "mean" and saved.
    """

    def __init__(self, config):
        # BertForSequenceClassification.__init__ would build a pooler only to drop it.
        BertPreTrainedModel.__init__(self, config)
        config.classifier_pooling = "mean"
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        outputs = self.bert(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            return_dict=True,
            **kwargs,
        )

        pooled = masked_mean(outputs.last_hidden_state, attention_mask)
        logits = self.classifier(self.dropout(pooled))

        loss = None
        if labels is not None:
            loss = self.loss_function(labels=labels, pooled_logits=logits, config=self.config)
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
