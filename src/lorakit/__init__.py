"""lorakit: fine-tune causal language models with LoRA and QLoRA on the hardware you have.

The public API (stable names; see README.md):

    model, tokenizer = lorakit.load_model(path, quantization=None | "nf4" | "fp4")
    lorakit.add_lora(model, lorakit.LoraConfig(r=16, alpha=32, target_modules="all-linear"))
    trainable, total = lorakit.count_parameters(model)
    lorakit.save_adapter(model, "out/adapter"); lorakit.load_adapter(model, "out/adapter")
    merged = lorakit.merge(model)
    # PiSSA / OLoRA on a 4-bit base: the residual is computed as the 16-bit weights load
    model, tokenizer = lorakit.load_model(path, quantization="nf4", prepare=lorakit.ResidualInit(lora_config))
    packed, state = lorakit.quantize_4bit(tensor); lorakit.dequantize_4bit(packed, state)

Training from Python (a notebook, a script; the recipe `lorakit train` runs):

    run = lorakit.finetune(model=path, data="train.jsonl", quantization="nf4", r=16, max_steps=200)
    run.plot(); run.generate("..."); run.evaluate("test.jsonl", exact_match=100); run.merge("out/")
    run = lorakit.Run.load("runs/x"); lorakit.estimate("llama-2-7b", method="qlora"); lorakit.sweep(...)
"""

from .api import EstimateTable, Run, SweepTable, estimate, finetune, sweep
from .config import ConfigError, DataConfig, LoraConfig, ModelConfig, RunConfig, TrainConfig, load_config
from .lora.embedding import LoRAEmbedding
from .lora.init import ResidualInit
from .lora.inject import add_lora, count_parameters, format_trainable, unload
from .lora.io import load_adapter, save_adapter
from .lora.layer import LoRALinear
from .lora.merge import MergeReport, MergeVerificationError, merge
from .model.load import load_model
from .quant.linear4bit import Linear4bit
from .quant.nf4 import dequantize_4bit, quantize_4bit

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "DataConfig", "LoraConfig", "ModelConfig", "RunConfig", "TrainConfig", "load_config",
    "add_lora", "count_parameters", "format_trainable", "unload", "load_adapter", "save_adapter",
    "LoRALinear", "LoRAEmbedding", "ResidualInit", "MergeReport", "MergeVerificationError", "merge", "load_model",
    "Linear4bit", "quantize_4bit", "dequantize_4bit", "finetune", "Run", "estimate", "sweep", "EstimateTable",
    "SweepTable",
]
