"""lockstep: fine-tune Hugging Face causal LMs from one YAML file, every rank in lockstep."""

__version__ = "0.1.0"
