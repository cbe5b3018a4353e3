"""LoRA layers, injection, merging and PEFT-format adapter files."""
