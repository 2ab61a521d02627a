"""tunefit measure: run real fine-tuning steps on a GPU and record memory and speed as JSON lines.

Imports only the standard library at package level; torch, transformers, peft, bitsandbytes and
nvidia-ml-py are imported where a run needs them (optional extra `tunefit[measure]`).
"""

SCHEMA_VERSION = 1
