"""Static (non-elastic) model classes for architectures stock BERT cannot represent.

Importing this package registers the ``autotinybert`` model type with transformers' Auto
classes, so exported checkpoints load in-process without ``trust_remote_code``. The classes are
also registered *for* those Auto classes (`register_for_auto_class`): transformers then treats
them as custom code, and a plain ``model.save_pretrained(path)`` copies the two modules next to
the weights and fills ``auto_map``, so the checkpoint loads with ``trust_remote_code=True`` on
machines without autotinybert.
"""

from pathlib import Path

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
)

from .configuration_autotinybert import AutoTinyBertConfig
from .modeling_autotinybert import (
    AutoTinyBertForMaskedLM,
    AutoTinyBertForQuestionAnswering,
    AutoTinyBertForSequenceClassification,
    AutoTinyBertModel,
)

SOURCE_FILES = tuple(Path(__file__).with_name(name) for name in
                     ("configuration_autotinybert.py", "modeling_autotinybert.py"))

# Written into config.json of every exported non-stock checkpoint.
AUTO_MAP = {
    "AutoConfig": "configuration_autotinybert.AutoTinyBertConfig",
    "AutoModel": "modeling_autotinybert.AutoTinyBertModel",
    "AutoModelForMaskedLM": "modeling_autotinybert.AutoTinyBertForMaskedLM",
    "AutoModelForSequenceClassification": "modeling_autotinybert.AutoTinyBertForSequenceClassification",
    "AutoModelForQuestionAnswering": "modeling_autotinybert.AutoTinyBertForQuestionAnswering",
}

_AUTO_CLASSES = (
    (AutoModel, AutoTinyBertModel),
    (AutoModelForMaskedLM, AutoTinyBertForMaskedLM),
    (AutoModelForSequenceClassification, AutoTinyBertForSequenceClassification),
    (AutoModelForQuestionAnswering, AutoTinyBertForQuestionAnswering),
)


def _register() -> None:
    AutoConfig.register(AutoTinyBertConfig.model_type, AutoTinyBertConfig, exist_ok=True)
    # save_pretrained copies a class's module (and its relative imports) only when it is
    # registered for an Auto class; without this the README's plain save_pretrained wrote an
    # auto_map naming files it did not copy.
    AutoTinyBertConfig.register_for_auto_class("AutoConfig")
    for auto_class, model_class in _AUTO_CLASSES:
        auto_class.register(AutoTinyBertConfig, model_class, exist_ok=True)
        model_class.register_for_auto_class(auto_class.__name__)


_register()

__all__ = [
    "AUTO_MAP",
    "SOURCE_FILES",
    "AutoTinyBertConfig",
    "AutoTinyBertForMaskedLM",
    "AutoTinyBertForQuestionAnswering",
    "AutoTinyBertForSequenceClassification",
    "AutoTinyBertModel",
]
