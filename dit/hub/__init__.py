"""Model files in and out: our export format and loading ours / official .pt / diffusers, strict and pickle-free
(files.py); the official and diffusers converters (convert.py); sharing: python -m dit.hub.export writes our
format or a diffusers DiTPipeline (pipeline.py) with a model card (card.py) and pushes it to the Hub.

The export CLI and the card are not imported here: loading a model does not pay for huggingface_hub or diffusers.
"""

from dit.hub.convert import from_diffusers, load_official_checkpoint, to_diffusers
from dit.hub.files import (
    FORMAT,
    ModelRecord,
    dit_state,
    export_config,
    load_model,
    objective_of,
    objective_settings,
    save_export,
)

__all__ = [
    "FORMAT",
    "ModelRecord",
    "dit_state",
    "export_config",
    "from_diffusers",
    "load_model",
    "load_official_checkpoint",
    "objective_of",
    "objective_settings",
    "save_export",
    "to_diffusers",
]
