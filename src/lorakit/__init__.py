"""lorakit: LoRA and QLoRA fine-tuning."""
