"""An Ollama Modelfile beside a GGUF: FROM, TEMPLATE and the stop words of the model's chat format.

Ollama reads Go templates ({{ .System }}, {{ .Prompt }}, {{ .Response }}), not the Jinja template
in the GGUF; without TEMPLATE and PARAMETER stop it guesses the format from the Jinja text and may
never stop generating (ollama/ollama#8363). So the chat template is recognised by the markers of
its family and written out as the Go equivalent, with that family's end-of-turn tokens as stops:

    ChatML (Qwen2, many fine-tunes)  <|im_start|>role ... <|im_end|>
    Llama-3                          <|start_header_id|>role<|end_header_id|> ... <|eot_id|>
    Gemma                            <start_of_turn>user|model ... <end_of_turn>
    Phi-3                            <|user|> ... <|end|> <|assistant|>
    Mistral / Llama-2                [INST] ... [/INST]
    Alpaca (lorakit's demo)          ### Instruction: ... ### Response:

Current Ollama no longer accepts LoRA adapters or quantizes GGUF at import, so the Modelfile
points at the merged GGUF as written (its quant is the one Ollama serves). BOS is left to the
model's add_bos setting (the Go template has none, unlike most Jinja templates).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..utils.fs import atomic_file, check_output_file

MARK = "# Modelfile written by lorakit"


@dataclass(frozen=True)
class ChatFormat:
    name: str
    markers: tuple[str, ...]   # all present in the Jinja chat template
    template: str              # Go template
    stops: tuple[str, ...]


FORMATS = (
    ChatFormat("chatml", ("<|im_start|>", "<|im_end|>"),
               "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
               "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}"
               "<|im_start|>assistant\n{{ .Response }}<|im_end|>\n",
               ("<|im_start|>", "<|im_end|>")),
    ChatFormat("llama3", ("<|start_header_id|>", "<|eot_id|>"),
               "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
               "{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}"
               "<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>",
               ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    ChatFormat("gemma", ("<start_of_turn>", "<end_of_turn>"),
               "<start_of_turn>user\n{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}<end_of_turn>\n"
               "<start_of_turn>model\n{{ .Response }}<end_of_turn>\n",
               ("<start_of_turn>", "<end_of_turn>")),
    ChatFormat("phi3", ("<|user|>", "<|end|>", "<|assistant|>"),
               "{{ if .System }}<|system|>\n{{ .System }}<|end|>\n{{ end }}"
               "{{ if .Prompt }}<|user|>\n{{ .Prompt }}<|end|>\n{{ end }}<|assistant|>\n{{ .Response }}<|end|>\n",
               ("<|end|>", "<|user|>", "<|assistant|>")),
    ChatFormat("mistral", ("[INST]", "[/INST]"),
               "[INST] {{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }} [/INST]{{ .Response }}",
               ("[INST]", "[/INST]")),
    ChatFormat("alpaca", ("### Instruction:", "### Response:"),
               "{{ if .System }}{{ .System }}\n\n{{ end }}### Instruction:\n{{ .Prompt }}\n\n### Response:\n{{ .Response }}",
               ()),
)


def chat_format(chat_template: Optional[str]) -> Optional[ChatFormat]:
    """The family of a Jinja chat template, by its markers (None: not one lorakit translates)."""
    if not isinstance(chat_template, str):
        return None
    for fmt in FORMATS:
        if all(m in chat_template for m in fmt.markers):
            return fmt
    return None


def modelfile_text(gguf_name: str, chat_template: Optional[str], eos: Optional[str]) -> tuple[str, Optional[ChatFormat]]:
    fmt = chat_format(chat_template)
    lines = [MARK, f"FROM ./{gguf_name}"]
    if fmt is not None:
        lines.append(f'TEMPLATE """{fmt.template}"""')
    stops = list(fmt.stops if fmt else ())
    if eos and eos not in stops:
        stops.append(eos)
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n", fmt


def is_lorakit_modelfile(path: Path) -> bool:
    try:
        return Path(path).read_text(encoding="utf-8").startswith(MARK)
    except (OSError, UnicodeDecodeError):
        return False


def write_modelfile(gguf_path: Path, chat_template: Optional[str], eos: Optional[str], overwrite: bool) -> tuple[Path, str, Optional[ChatFormat]]:
    """Write `Modelfile` beside the GGUF; returns (its path, the `ollama create` command, the format)."""
    gguf_path = Path(gguf_path)
    path = gguf_path.parent / "Modelfile"
    check_output_file(path, "Ollama Modelfile", overwrite, is_lorakit_modelfile)
    text, fmt = modelfile_text(gguf_path.name, chat_template, eos)
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    name = gguf_path.stem.lower().replace("_", "-")
    return path, f"ollama create {name} -f {path}", fmt
