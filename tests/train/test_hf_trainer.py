"""Users mix tools: a lorakit-adapted model trains under transformers.Trainer, and its adapter
saves with lorakit and reloads (in lorakit and in PEFT) with the trained weights."""

import pytest
import torch
from torch.utils.data import Dataset

import lorakit

from tiny_models import tiny_model


class FixedBatch(Dataset):
    def __init__(self, n=8, length=12, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 160, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i], "attention_mask": torch.ones_like(self.ids[i])}


def test_trainer_trains_lorakit_model_and_adapter_roundtrips(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = lorakit.add_lora(tiny_model("llama", initializer_range=0.2).train(), lorakit.LoraConfig(r=8, alpha=16))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=4, max_steps=15,
                             learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[],
                             use_cpu=True, disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=FixedBatch())
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 15 and losses[-1] < losses[0]
    assert result.global_step == 15
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(changed) == len(before)  # every LoRA matrix moved

    lorakit.save_adapter(model, tmp_path / "adapter")
    ids = FixedBatch().ids[:2]
    model.eval()
    with torch.no_grad():
        want = model(ids).logits
        ours = lorakit.load_adapter(tiny_model("llama", initializer_range=0.2), tmp_path / "adapter")(ids).logits
    assert (ours - want).abs().max() <= 1e-5
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(tiny_model("llama", initializer_range=0.2), str(tmp_path / "adapter"))
    with torch.no_grad():
        assert (theirs(ids).logits - want).abs().max() <= 1e-5
