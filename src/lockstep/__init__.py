"""lockstep: fine-tune Hugging Face causal LMs from one YAML file, every rank in lockstep."""

__version__ = "0.1.0"
DISTRIBUTION = "lockstep-finetune"
"""The name lockstep is installed by (`pip install lockstep-finetune`); it imports as lockstep
and its command is `lockstep` (the name lockstep on the package index is another project)."""
