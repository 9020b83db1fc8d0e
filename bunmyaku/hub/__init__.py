"""Hugging Face checkpoint format: folders, safetensors (single and sharded), key maps, GGUF."""

from bunmyaku.hub.files import (
    CheckpointError,
    load_state_dict,
    read_config,
    resolve_model_dir,
    save_state_dict,
    write_json_atomic,
    write_jsonl_atomic,
    write_text_atomic,
)
from bunmyaku.hub.keymap import KeyMap

__all__ = [
    "CheckpointError",
    "KeyMap",
    "load_state_dict",
    "read_config",
    "resolve_model_dir",
    "save_state_dict",
    "write_json_atomic",
    "write_jsonl_atomic",
    "write_text_atomic",
]
