"""Typed, frozen run configuration.

YAML is only a file format: a config file is parsed into these dataclasses, which check every
value when they are built. Each field's docstring (the string literal under it) is its `--help`
text. Unknown keys and wrong types are errors that name the key and what is allowed; dotted
overrides such as ``train.lr=2e-4`` patch one field.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range; the message names it."""


def _allowed(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")


BIAS_MODES = ("none", "all", "lora_only")
QUANT_TYPES = (None, "nf4", "fp4")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw_torch", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit")
DATA_FORMATS = ("auto", "dolly", "alpaca", "chat", "prompt_completion", "text", "preference")
TEMPLATES = ("auto", "chat", "alpaca", "alpaca_short")
TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
# lora.init values (PEFT init_lora_weights): "pissa_niter_N" (N >= 1 power iterations) is also allowed.
LORA_INITS = ("default", "gaussian", "pissa", "olora")


@dataclass(frozen=True)
class LoraConfig:
    r: int = 8
    """LoRA rank: the inner dimension of B @ A (B is [out, r], A is [r, in])."""
    alpha: float = 16.0
    """LoRA alpha; the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora)."""
    dropout: float = 0.0
    """Dropout probability on the LoRA branch input, in [0, 1)."""
    target_modules: Union[str, tuple[str, ...]] = "all-linear"
    """Layers to adapt: "all-linear" (every Linear/Conv1D but the output head), a regex matched
    against the full module name, or a list of module-name suffixes (PEFT semantics)."""
    exclude_modules: Optional[Union[str, tuple[str, ...]]] = None
    """Layers never to adapt: a regex or a list of module-name suffixes."""
    modules_to_save: tuple[str, ...] = ()
    """Modules trained in full and saved with the adapter (e.g. embed_tokens, lm_head)."""
    bias: str = "none"
    """Which biases train: "none", "all" (every bias in the model), "lora_only" (biases of adapted layers)."""
    use_rslora: bool = False
    """Rank-stabilised LoRA: scale by alpha / sqrt(r) instead of alpha / r (Kalajdzievski, 2023)."""
    adapter_dtype: str = "float32"
    """dtype of the LoRA weights: "float32" (default, stable updates) or "compute" (the base layer's dtype)."""
    branch_dtype: str = "compute"
    """dtype of the LoRA branch's matmuls: "compute" (default: the activations' dtype, e.g. bf16, on
    bf16 copies of the fp32 weights, as autocast does; faster, less memory) or "adapter" (cast the
    activations to the adapter dtype, as PEFT does)."""
    use_dora: bool = False
    """DoRA (Liu et al. 2024, PEFT use_dora): a trainable magnitude per output row times the
    direction W + scaling * B @ A normalised per row (the norm detached, as in the paper)."""
    init: str = "default"
    """Initialisation of A and B (PEFT init_lora_weights): "default" (Kaiming-uniform A, zero B),
    "gaussian" (A ~ N(0, 1/r^2), zero B), "pissa" (the top-r singular vectors of W move into A and
    B, the residual stays frozen; "pissa_niter_N": randomized SVD with N power iterations, faster)
    or "olora" (QR of W). With pissa/olora and a 4-bit base the residual is what gets quantized.
    Embedding layers always get PEFT's embedding init (A = 0, B ~ N(0, 1))."""
    save_converted: bool = True
    """With init pissa/olora: also write <adapter>/as_lora/, the same adapter as a plain rank-2r
    LoRA of the original (unmodified) base model (PEFT's path_initial_model_for_weight_conversion)."""

    def __post_init__(self):
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if isinstance(self.exclude_modules, list):
            object.__setattr__(self, "exclude_modules", tuple(self.exclude_modules))
        if isinstance(self.modules_to_save, (list, str)):
            mts = (self.modules_to_save,) if isinstance(self.modules_to_save, str) else tuple(self.modules_to_save)
            object.__setattr__(self, "modules_to_save", mts)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ConfigError(f"lora.r={self.r!r} is not allowed; r must be an integer > 0")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ConfigError(f"lora.alpha={self.alpha!r} is not allowed; alpha must be a number > 0")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout={self.dropout!r} is not allowed; dropout must be in [0, 1)")
        _allowed("lora.bias", self.bias, BIAS_MODES)
        _allowed("lora.adapter_dtype", self.adapter_dtype, ("float32", "compute"))
        _allowed("lora.branch_dtype", self.branch_dtype, ("compute", "adapter"))
        if not (self.init in LORA_INITS or is_pissa_niter(self.init)):
            raise ConfigError(f"lora.init={self.init!r} is not allowed; choose one of "
                              f"{', '.join(map(repr, LORA_INITS))} or 'pissa_niter_N' (N >= 1, e.g. 'pissa_niter_4')")
        if not self.target_modules:
            raise ConfigError("lora.target_modules is empty; give 'all-linear', a regex, or a list of module names")

    @property
    def scaling(self) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA (LoRA paper eq. 4; rsLoRA paper, 2023)."""
        return self.alpha / (self.r ** 0.5 if self.use_rslora else self.r)

    @property
    def residual_init(self) -> bool:
        """True for inits that move part of W into A/B and leave a residual base (pissa*, olora)."""
        return self.init == "olora" or self.init.startswith("pissa")


def is_pissa_niter(init) -> bool:
    head, _, n = str(init).partition("pissa_niter_")
    return head == "" and n.isdigit() and int(n) >= 1


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = ""
    """Local folder with config.json + *.safetensors (+ tokenizer), or a Hugging Face hub id."""
    quantization: Optional[str] = None
    """Store the frozen base in 4 bits: null (16-bit LoRA), "nf4" (QLoRA) or "fp4"."""
    double_quant: bool = True
    """Quantize the 4-bit block scales again (8-bit, blocks of 256): 4.5 -> 4.127 bits per weight."""
    blocksize: int = 64
    """Weights per fp32 absmax scale in 4-bit storage (64 as in QLoRA; 32..4096, a power of two)."""
    skip_modules: tuple[str, ...] = ("lm_head",)
    """Linear layers kept in the compute dtype when quantizing (embeddings and norms always are)."""
    trust_remote_code: bool = False
    """Run model code shipped with a hub checkpoint. Off unless you trust the source."""
    mmap_embeddings: bool = True
    """On CPU, map the frozen input embedding from its safetensors file (copy-on-write) instead of
    reading it into memory: only the rows of tokens actually seen become resident (Qwen2.5-0.5B:
    ~270 MB less peak RSS). Needs the file stored in the compute dtype; otherwise it is read. The
    file must not be overwritten in place while the model lives (replacing it by a new file is safe)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward: less memory, ~30% more compute."""
    checkpoint_replay: bool = True
    """With gradient_checkpointing: keep the outputs of the adapted frozen base layers (4-bit or
    16-bit) no wider than their input (q/k/v/o, down) and replay them instead of recomputing
    (Qwen2.5-0.5B QLoRA, T=256: ~18% faster steps, +~1.5 MB per layer; costs up to 5 x hidden x
    seq_len values per layer for models without grouped-query attention). false = plain
    recomputation, least memory."""

    lean_activations: bool = True
    """In training, keep fewer activations for backward with the same forward values
    (model/lean.py): gated MLPs (Llama, Qwen2, Mistral, Gemma, Phi-3) keep only their gate and up
    outputs and rebuild the activation and the down projection's input from them (gradients bit
    for bit the same; 2 x intermediate x seq_len fewer values per layer), and RMSNorms (Llama,
    Qwen2, Mistral, Phi-3) keep their input in the compute dtype instead of an fp32 copy.
    Qwen2.5-0.5B, T=256, no checkpointing: ~140 MB less."""
    fast_paths: bool = True
    """Step-level optimisations that change how a step computes, never what (train/setup.py): lean
    activations, checkpoint replay, the fused head loss and the compiled 4-bit kernels. false (or
    `lorakit train --reference`) turns them all off for debugging numerics: the plain references."""

    def __post_init__(self):
        if isinstance(self.skip_modules, (list, str)):
            sm = (self.skip_modules,) if isinstance(self.skip_modules, str) else tuple(self.skip_modules)
            object.__setattr__(self, "skip_modules", sm)
        _allowed("model.quantization", self.quantization, QUANT_TYPES)
        if not (isinstance(self.blocksize, int) and 32 <= self.blocksize <= 4096 and self.blocksize & (self.blocksize - 1) == 0):
            raise ConfigError(f"model.blocksize={self.blocksize!r} is not allowed; use a power of two in 32..4096")


@dataclass(frozen=True)
class DataConfig:
    path: str = ""
    """Training data: a .jsonl/.json/.csv/.parquet file, or a Hugging Face dataset id when online."""
    format: str = "auto"
    """Row format: auto (detected from the fields), dolly, alpaca, chat, prompt_completion, text or
    preference (prompt, chosen, rejected: pairs for train.objective dpo / orpo)."""
    template: str = "auto"
    """How dolly, alpaca and prompt_completion rows become text: "chat" (the instruction as a user turn,
    the answer as the assistant turn, through the tokenizer's own chat template), "alpaca" (the Alpaca
    prompt with its one-sentence preamble), "alpaca_short" (without it), or "auto": chat when the
    tokenizer has a chat template (an instruct model), else alpaca. generate, chat and eval read the
    template a run used from its run_config.yaml beside the adapter."""
    val_path: Optional[str] = None
    """A separate validation file; if unset, val_size rows are held out from `path`."""
    val_size: float = 0.1
    """Held-out validation rows: a fraction in (0, 1) or a count >= 1 (0 disables validation)."""
    max_seq_len: int = 512
    """Examples longer than this many tokens are truncated (and counted)."""
    train_on_inputs: bool = False
    """Also supervise the prompt tokens (by default only the response and its EOS are)."""
    pack: bool = False
    """Pack several examples into one row of max_seq_len; attention never crosses examples."""

    def __post_init__(self):
        _allowed("data.format", self.format, DATA_FORMATS)
        _allowed("data.template", self.template, TEMPLATES)
        if not isinstance(self.max_seq_len, int) or self.max_seq_len < 8:
            raise ConfigError(f"data.max_seq_len={self.max_seq_len!r} is not allowed; use an integer >= 8")
        if not isinstance(self.val_size, (int, float)) or self.val_size < 0:
            raise ConfigError(f"data.val_size={self.val_size!r} is not allowed; use a fraction in (0, 1), a count >= 1, or 0")


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str = "runs/lorakit"
    """Run folder: checkpoints, metrics.jsonl, the loss curve and the final adapter go here."""
    epochs: float = 1.0
    """Passes over the training set (ignored when max_steps > 0)."""
    max_steps: int = 0
    """Optimizer steps to run; 0 means derive from epochs."""
    micro_batch_size: int = 4
    """Examples per forward/backward pass."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; the loss is normalised by supervised tokens across all of them."""
    lr: float = 2e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    warmup_steps: int = 0
    """Linear warmup steps from 0 to lr."""
    schedule: str = "cosine"
    """Learning-rate schedule after warmup: cosine, linear or constant."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    optimizer: str = "adamw_torch"
    """adamw_torch, adamw_8bit, paged_adamw_32bit or paged_adamw_8bit."""
    precision: str = "auto"
    """dtype of the frozen weights and activations: auto (chosen per device: bf16 on CPUs with native
    bf16 and on Ampere+ GPUs), bf16, fp16 (with loss scaling) or fp32. LoRA weights stay fp32."""
    seed: int = 42
    """Seed for initialisation, data split and order, and dropout."""
    eval_every: int = 50
    """Evaluate on the validation set every N optimizer steps (and at the end); 0 only at the end."""
    save_every: int = 100
    """Write a checkpoint every N optimizer steps (0: only at the end)."""
    keep_last: int = 2
    """Checkpoints to keep besides the best one."""
    early_stopping_patience: int = 0
    """Stop after this many evaluations without improvement of min_delta (0 disables)."""
    early_stopping_min_delta: float = 0.0
    """Smallest validation-loss decrease that counts as an improvement."""
    max_bad_steps: int = 5
    """Stop after this many consecutive steps with a non-finite loss or gradient."""
    fit_memory: Optional[str] = None
    """Memory budget such as "15GiB": the planner picks the largest micro-batch that fits and keeps
    micro_batch_size * grad_accum (the effective batch) by raising grad_accum."""
    loss_chunk_size: int = 1024
    """Tokens per chunk of the cross-entropy, so fp32 logits never exist for the whole batch."""
    sample_every: int = 1
    """Write sample answers to samples.jsonl at every Nth evaluation (1: each one; 0: never): the
    adapter answers num_samples fixed validation prompts, greedy, shown in report.html beside the
    expected answers."""
    num_samples: int = 3
    """Validation prompts answered at each sampling evaluation."""
    sample_max_new_tokens: int = 48
    """Most tokens of each sample answer."""
    report_to: Union[str, tuple[str, ...]] = ()
    """Mirror metrics and the config to experiment trackers: any of "tensorboard" (event files in the
    run folder's tensorboard/), "wandb", "mlflow", "trackio" (each library is needed only when named);
    empty or "none": metrics.jsonl only."""
    distributed: str = "auto"
    """Under torchrun with several processes: "ddp" (every rank holds the whole base; gradients
    all-reduced), "fsdp2" (the frozen 4-bit codes, LoRA weights and optimizer state sharded over the
    ranks: a base too big for one device), or "auto" (fsdp2 when the memory planner says the run does
    not fit one device, else ddp). Ignored in one process."""
    fsdp_reshard_after_forward: bool = True
    """fsdp2: free each layer's gathered weights after its forward (less memory, one more all-gather
    per layer in backward; false keeps them until backward)."""
    dist_timeout_s: float = 600.0
    """Seconds a collective may wait for the other ranks before the job fails (a hung or dead rank
    ends the run with an error instead of a silent wait)."""
    log_every: int = 1
    """Write a metrics line every N optimizer steps."""
    loraplus_lr_ratio: float = 0.0
    """LoRA+ (Hayou et al. 2024, PEFT create_loraplus_optimizer): the B matrices (lora_B, embedding
    B) and 1-D parameters (biases, DoRA magnitudes) train at ratio x lr, A at lr; 0 = off (the
    paper suggests 16)."""
    objective: str = "sft"
    """What to minimise: "sft" (next-token cross-entropy on the answers), "dpo" (direct preference
    optimisation on preference pairs, against the base model with the adapters off: no second copy)
    or "orpo" (the chosen answer's cross-entropy plus an odds-ratio term, no reference). dpo and orpo
    need data in the preference format (prompt, chosen, rejected); docs/preference.md."""
    dpo_beta: float = 0.1
    """DPO's beta: how far the adapter may move from the reference (higher: closer); > 0."""
    dpo_loss: str = "sigmoid"
    """DPO loss: "sigmoid" (the paper's -log sigmoid(beta * margin)) or "ipo" (the squared loss of
    Azar et al. 2023 on per-token log-ratios, as TRL's loss_type="ipo")."""
    dpo_label_smoothing: float = 0.0
    """cDPO (Mitchell 2023): assume this share of the preference labels is flipped, in [0, 0.5);
    sigmoid loss only."""
    precompute_ref_logps: bool = False
    """DPO: compute the reference log-probabilities once per pair before training (one no-grad pass
    over the data) instead of a reference forward in every step: faster steps."""
    orpo_lambda: float = 0.1
    """ORPO's lambda: the weight of the odds-ratio term beside the chosen answer's cross-entropy; > 0."""
    neftune_alpha: float = 0.0
    """NEFTune (Jain et al. 2023, as transformers/TRL neftune_noise_alpha): add uniform noise of
    magnitude alpha / sqrt(L * d) to the input embeddings in training only (L = the padded row
    length, d = hidden size); 0 = off (the paper uses 5)."""

    def __post_init__(self):
        _allowed("train.schedule", self.schedule, SCHEDULES)
        _allowed("train.optimizer", self.optimizer, OPTIMIZERS)
        _allowed("train.precision", self.precision, PRECISIONS)
        _allowed("train.distributed", self.distributed, ("auto", "ddp", "fsdp2"))
        if self.dist_timeout_s <= 0:
            raise ConfigError(f"train.dist_timeout_s={self.dist_timeout_s!r} is not allowed; it must be > 0")
        for name in ("micro_batch_size", "grad_accum", "loss_chunk_size", "log_every", "sample_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)!r} is not allowed; it must be >= 1")
        if isinstance(self.report_to, (list, str)):
            names = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)
            object.__setattr__(self, "report_to", tuple(n for n in names if n != "none"))
        for name in self.report_to:
            _allowed("train.report_to", name, TRACKERS + ("none",))
        for name in ("max_steps", "warmup_steps", "eval_every", "save_every", "keep_last", "early_stopping_patience",
                     "max_bad_steps", "sample_every", "num_samples"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}={getattr(self, name)!r} is not allowed; it must be >= 0")
        if self.lr <= 0:
            raise ConfigError(f"train.lr={self.lr!r} is not allowed; it must be > 0")
        if not self.loraplus_lr_ratio >= 0:
            raise ConfigError(f"train.loraplus_lr_ratio={self.loraplus_lr_ratio!r} is not allowed; use 0 (off) or "
                              f"a ratio > 0 (the lr of B over that of A; 16 in the LoRA+ paper)")
        _allowed("train.objective", self.objective, ("sft", "dpo", "orpo"))
        _allowed("train.dpo_loss", self.dpo_loss, ("sigmoid", "ipo"))
        for name in ("dpo_beta", "orpo_lambda"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"train.{name}={getattr(self, name)!r} is not allowed; it must be > 0")
        if not 0 <= self.dpo_label_smoothing < 0.5:
            raise ConfigError(f"train.dpo_label_smoothing={self.dpo_label_smoothing!r} is not allowed; use a value in [0, 0.5)")
        if self.dpo_label_smoothing and self.dpo_loss != "sigmoid":
            raise ConfigError("train.dpo_label_smoothing applies to train.dpo_loss=sigmoid only")
        if not self.neftune_alpha >= 0:
            raise ConfigError(f"train.neftune_alpha={self.neftune_alpha!r} is not allowed; use 0 (off) or a value > 0 (e.g. 5)")


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.train.objective == "sft":
            return
        if self.data.pack:
            raise ConfigError(f"data.pack=true does not apply to train.objective={self.train.objective}: a preference "
                              "pair is two sequences compared as wholes; set data.pack=false")
        if self.data.format not in ("auto", "preference"):
            raise ConfigError(f"train.objective={self.train.objective} needs data.format=preference (or auto), got "
                              f"{self.data.format!r}")
        if self.train.objective == "dpo" and self.lora.residual_init:
            raise ConfigError(f"train.objective=dpo with lora.init={self.lora.init!r}: the base with the adapters off "
                              "is the residual, not the original model, so it cannot be DPO's reference; use "
                              "lora.init default or gaussian")
        if self.train.objective == "dpo" and self.lora.bias != "none":
            raise ConfigError(f"train.objective=dpo with lora.bias={self.lora.bias!r}: a trained bias has no 'adapter "
                              "off', so the reference would not be the base model; use lora.bias none")


# ---------------------------------------------------------------- building from dicts / YAML


def field_docs(cls) -> dict[str, str]:
    """Field name -> the docstring written under it in the class body (used for --help)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for prev, node in zip(body, body[1:]):
        if isinstance(prev, ast.AnnAssign) and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            docs[prev.target.id] = " ".join(str(node.value.value).split())
    return docs


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is tuple:
        return isinstance(value, (tuple, list)) and all(isinstance(v, str) for v in value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass `cls` from a plain dict, checking keys and types; nested sections recurse."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"unknown config key {path!r}; allowed keys: {', '.join(sorted(names))}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, path)
            continue
        if isinstance(value, str) and _type_ok(0.5, tp) and not _type_ok(value, tp):
            value = _float_or_same(value)  # YAML 1.1 reads "2e-4" as a string
        if not _type_ok(value, tp):
            raise ConfigError(f"{path}={value!r} has the wrong type; expected {_type_name(tp)}")
        kwargs[key] = value
    return cls(**kwargs)


def _float_or_same(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def to_dict(cfg) -> dict:
    """Plain nested dict (tuples as lists), ready for YAML or JSON."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = to_dict(v) if dataclasses.is_dataclass(v) else list(v) if isinstance(v, tuple) else v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=2e-4' -> (['train', 'lr'], 0.0002). Values are parsed as YAML scalars/lists."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. train.lr=2e-4)")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else None
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Patch a nested dict with dotted overrides; the result is validated by `from_dict` later."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k!r} is not a section")
        node[keys[-1]] = value
    return out


def load_config(path: Optional[str | Path] = None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML file (optional), apply dotted overrides, and validate into a RunConfig."""
    import yaml

    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping with sections model/lora/data/train")
    data = apply_overrides(data, list(overrides))
    return from_dict(RunConfig, data)


# ---------------------------------------------------------------- the command line (config = CLI)


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The flags that build a RunConfig (`lorakit train`, `lorakit sweep`): a YAML file, shortcuts,
    --set overrides and one --section.field flag per field, documented by its docstring."""
    p.add_argument("config", nargs="?", help="YAML config file (sections: model, lora, data, train)")
    p.add_argument("--model", dest="shortcut_model", metavar="PATH", help="shortcut for --model.name_or_path")
    p.add_argument("--data", dest="shortcut_data", metavar="FILE", help="shortcut for --data.path")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one field, e.g. --set train.lr=2e-4 (repeatable)")
    p.add_argument("--fit-memory", dest="shortcut_fit", metavar="SIZE", help="shortcut for --train.fit_memory (e.g. 15GiB)")
    p.add_argument("--reference", dest="shortcut_reference", action="store_true",
                   help="shortcut for --model.fast_paths false: every step-level fast path off (debugging numerics)")
    for section, cls in typing.get_type_hints(RunConfig).items():
        group = p.add_argument_group(f"{section} options (YAML section '{section}:')")
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            group.add_argument(f"--{section}.{f.name}", dest=f"field:{section}.{f.name}", metavar="VALUE",
                               help=f"{docs.get(f.name, '')} [default: {default!r}]".replace("%", "%%"))


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """RunConfig from flags added by add_run_arguments: YAML file, then --set overrides, shortcuts
    and --section.field flags, in that order."""
    overrides = list(args.set)
    for attr, key in (("shortcut_model", "model.name_or_path"), ("shortcut_data", "data.path"),
                      ("shortcut_fit", "train.fit_memory")):
        if getattr(args, attr, None):
            overrides.append(f"{key}={getattr(args, attr)}")
    if getattr(args, "shortcut_reference", False):
        overrides.append("model.fast_paths=false")
    for key, value in vars(args).items():
        if key.startswith("field:") and value is not None:
            overrides.append(f"{key[len('field:'):]}={value}")
    cfg = load_config(args.config, overrides)
    if not cfg.model.name_or_path:
        raise ConfigError("model.name_or_path is not set; give --model PATH or model.name_or_path in the config")
    if not cfg.data.path:
        raise ConfigError("data.path is not set; give --data FILE or data.path in the config")
    return cfg
