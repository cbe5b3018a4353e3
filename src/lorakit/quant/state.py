"""QuantState: everything except the packed codes needed to dequantize a 4-bit tensor.

Serialized form (``to_dict``), every value a plain tensor so it can go into safetensors.
Tensor key names follow bitsandbytes' ``QuantState.as_dict`` where the meaning is the same:

    {prefix}absmax            fp32 [n_blocks]            (uint8 [n_blocks] when double-quantized)
    {prefix}quant_map         fp32 [16]                  the 4-bit code table (NF4 or FP4)
    {prefix}nested_absmax     fp32 [ceil(n_blocks/256)]  second-level absmax   (double quant only)
    {prefix}nested_quant_map  fp32 [256]                 signed dynamic map    (double quant only)
    {prefix}nested_offset     fp32 [1]                   mean subtracted from absmax (double quant only)
    {prefix}quant_state       uint8 [k]                  UTF-8 JSON of the non-tensor fields:
        {"format": 1, "quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16",
         "shape": [out, in], "nested_blocksize": 256 or null}

Unlike bitsandbytes (which keeps the offset as a float inside its JSON blob) the offset is
a tensor, so that it moves with ``.to(device)`` like every other part of the state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Optional

import torch

from ..dtypes import long_name, to_dtype

_FORMAT_VERSION = 1
_TENSOR_FIELDS = {  # to_dict key -> dataclass attribute
    "absmax": "absmax",
    "quant_map": "code",
    "nested_absmax": "absmax2",
    "nested_quant_map": "code2",
    "nested_offset": "offset",
}
META_KEY = "quant_state"
STATE_KEYS = (*_TENSOR_FIELDS, META_KEY)  # every to_dict key, in order (the one list of them)
NESTED_KEYS = tuple(k for k in STATE_KEYS if k.startswith("nested_"))  # present only with double quant


@dataclass
class QuantState:
    """Block scales and code tables of one 4-bit tensor (packed codes are kept separately).

    shape, dtype: of the original tensor (dequantization returns this by default).
    blocksize: elements per first-level block; quant_type: "nf4" or "fp4".
    absmax: fp32 [n_blocks], or uint8 [n_blocks] codes when double-quantized (``nested``).
    code: fp32 [16] value of each 4-bit index.
    offset, absmax2, code2, blocksize2: the double-quantization part, all None without it:
        absmax = dequantize_blockwise(absmax, absmax2, code2, blocksize2) + offset.
    """

    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    absmax: torch.Tensor
    code: torch.Tensor
    offset: Optional[torch.Tensor] = None
    absmax2: Optional[torch.Tensor] = None
    code2: Optional[torch.Tensor] = None
    blocksize2: Optional[int] = None

    def __post_init__(self) -> None:
        self.shape = torch.Size(self.shape)
        nested_parts = (self.offset, self.absmax2, self.code2, self.blocksize2)
        if any(p is None for p in nested_parts) and any(p is not None for p in nested_parts):
            raise ValueError("QuantState: offset, absmax2, code2 and blocksize2 must be all set or all None")

    @property
    def nested(self) -> bool:
        """True when absmax is itself 8-bit quantized (double quantization)."""
        return self.absmax2 is not None

    @property
    def numel(self) -> int:
        return self.shape.numel()

    def tensors(self) -> dict[str, torch.Tensor]:
        """The state's tensors under their to_dict key names (without the JSON metadata)."""
        out = {}
        for key, attr in _TENSOR_FIELDS.items():
            value = getattr(self, attr)
            if value is not None:
                out[key] = value.reshape(1) if key == "nested_offset" else value
        return out

    def metadata(self) -> dict:
        return {
            "format": _FORMAT_VERSION,
            "quant_type": self.quant_type,
            "blocksize": int(self.blocksize),
            "dtype": long_name(self.dtype),
            "shape": [int(s) for s in self.shape],
            "nested_blocksize": None if self.blocksize2 is None else int(self.blocksize2),
        }

    def to_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Plain tensors (safetensors-storable); see the module docstring for the keys."""
        out = {prefix + key: value for key, value in self.tensors().items()}
        blob = json.dumps(self.metadata(), sort_keys=True).encode("utf-8")
        out[prefix + META_KEY] = torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone()  # [len(blob)]
        return out

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor], prefix: str = "") -> "QuantState":
        """Inverse of :meth:`to_dict`; extra keys in ``d`` are ignored."""
        if prefix + META_KEY not in d:
            raise KeyError(f"QuantState.from_dict: missing key {prefix + META_KEY!r}")
        tensors = {k[len(prefix) :]: v for k, v in d.items() if k.startswith(prefix) and k != prefix + META_KEY}
        return cls.from_tensors(tensors, decode_metadata(d[prefix + META_KEY]))

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "QuantState":
        """Build from un-prefixed tensor keys (see ``tensors()``) and a ``metadata()`` dict."""
        if meta.get("format") != _FORMAT_VERSION:
            raise ValueError(f"QuantState format {meta.get('format')!r} is not supported (expected {_FORMAT_VERSION})")
        nested = meta["nested_blocksize"] is not None
        fields = {}
        for key, attr in _TENSOR_FIELDS.items():
            if key.startswith("nested_") and not nested:
                continue
            if key not in tensors:
                raise KeyError(f"QuantState: missing tensor {key!r}")
            fields[attr] = tensors[key]
        if nested:
            fields["offset"] = fields["offset"].reshape(())  # stored as [1], used as a scalar
        return cls(
            shape=torch.Size(meta["shape"]),
            dtype=to_dtype(meta["dtype"]),
            blocksize=meta["blocksize"],
            quant_type=meta["quant_type"],
            blocksize2=meta["nested_blocksize"],
            **fields,
        )

    def nbytes(self) -> int:
        """Bytes of everything ``to_dict`` stores (scales, code tables, metadata); not the packed codes."""
        return sum(t.numel() * t.element_size() for t in self.to_dict().values())

    def to(self, device) -> "QuantState":
        """A copy with every tensor on ``device`` (values and dtypes unchanged)."""
        moved = {attr: getattr(self, attr).to(device) for attr in _TENSOR_FIELDS.values() if getattr(self, attr) is not None}
        return replace(self, **moved)


def decode_metadata(blob: torch.Tensor) -> dict:
    """The JSON dict stored in a ``quant_state`` uint8 tensor."""
    return json.loads(bytes(blob.detach().cpu().to(torch.uint8).tolist()).decode("utf-8"))
