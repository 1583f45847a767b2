"""PyTorch / timm / torchvision checkpoints -> eqjax Flax variables.

``convert(name, state_dict)`` is a pure function (no torch import); ``load_state_dict``
reads ``.pth`` / ``.safetensors`` files; ``python -m weights_convert`` converts and
saves a checkpoint directory that ``eqjax.checkpoint.load`` reads; ``state_dict_of`` runs
``convert`` backwards, and ``python -m weights_convert.export`` writes a trained checkpoint as a
committable ``.safetensors`` state_dict with a JSON of how it was made.
"""

from weights_convert.core import ConversionError, convert, infer_num_classes, state_dict_of, unwrap_state_dict
from weights_convert.io import load_state_dict, preprocessing_beside, timm_preprocessing, timm_state_dict

__all__ = ["ConversionError", "convert", "infer_num_classes", "state_dict_of", "unwrap_state_dict",
           "load_state_dict", "preprocessing_beside", "timm_state_dict", "timm_preprocessing"]
