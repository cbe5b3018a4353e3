"""Build the assets of `lorakit demo`: a tiny pre-trained Llama, its tokenizer, and a task dataset.

    python scripts/make_demo_assets.py            # writes src/lorakit/assets/demo/

Runtime: measured 10.5 minutes (630 s) for the shipped model on a shared 2-core AVX512-BF16 CPU,
1 torch thread: corpus, tokenizer and dataset ~10 s, then ~0.31 s per pre-training step; the run
stopped at step 2000 (the look-up check below; the cap of 3000 steps would be ~16 minutes).
Seeded: the corpus, the dataset and the tokenizer are identical between runs; the weights are
identical for the same torch version and thread count (--threads, default 1). Checked 2026-11-29:
a rebuild (670 s, torch 2.13 CPU) reproduced every shipped file byte for byte (sha256).

What it writes (see src/lorakit/assets/demo/README.md):
  model/        LlamaForCausalLM (safetensors, bfloat16) + PreTrainedTokenizerFast (byte-level BPE)
  train.jsonl   dolly rows of the demo task, never seen in pre-training
  test.jsonl    held-out dolly rows of the same task (their responses never occur in train.jsonl)

The world is synthetic: ~120 lowercase English words, template sentences, word lists, person
records ("name: anna, city: paris, pet: cat, color: red") and alpaca-style instructions for a
few tasks (one-field look-ups in a record, first/last word of a list, ...). The demo task
("Write one sentence about the person." -> "anna lives in paris.") is absent from pre-training;
it composes two look-ups the base model already does, so a LoRA learns it in 150-250 steps.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

# ---------------------------------------------------------------- the synthetic world

ANIMALS = ("cat dog fox owl bear wolf lion tiger horse mouse rabbit duck goat sheep pig cow frog "
           "fish bird deer seal whale shark snake crab bee ant eagle hawk swan").split()
FOODS = ("apple pear plum grape lemon melon peach cherry mango banana bread cheese rice soup "
         "cake milk tea honey salt corn").split()
COLORS = "red blue green yellow black white brown pink purple orange gray gold".split()
OBJECTS = ("book pen cup lamp chair table door key box ball hat coat shoe ring clock bell boat "
           "car bike kite map bag bed desk rope").split()
NAMES = ("anna ben carl dora emma finn gina hugo ivy jack kate leo mia nick olga paul rosa sam "
         "tina victor").split()
CITIES = ("paris london rome tokyo cairo lima oslo delhi berlin madrid boston sydney dublin "
          "vienna prague").split()
VERBS = "sees likes eats finds has wants takes makes holds buys".split()
ADJS = "big small old new happy sad fast slow warm cold".split()
LIST_WORDS = ANIMALS + FOODS + COLORS + OBJECTS  # 87 distinct words the lists are drawn from
CATEGORIES = {"animal": ANIMALS, "food": FOODS, "color": COLORS, "object": OBJECTS}

# The prompt template lorakit renders dolly rows with (alpaca style, Input omitted if empty).
PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"

# The demo task (record -> sentence, see demo_response): never rendered into pre-training.
DEMO_INSTRUCTIONS = (
    "Write one sentence about the person.",
    "Describe the person in one sentence.",
    "Turn the record into a sentence.",
)


def render(instruction: str, context: str, response: str = "") -> str:
    """One dolly row as text (without BOS/EOS, which the tokenizer and the batcher add)."""
    tpl = PROMPT_WITH_INPUT if context else PROMPT_NO_INPUT
    return tpl.format(instruction=instruction, context=context) + response


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def sample_record(rng: random.Random) -> dict:
    return {"name": rng.choice(NAMES), "city": rng.choice(CITIES),
            "pet": rng.choice(ANIMALS), "color": rng.choice(COLORS)}


def record_text(rec: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in rec.items())  # "name: anna, city: paris, pet: cat, color: red"


def demo_response(rec: dict) -> str:
    """The demo task's answer: the record's name and city as a sentence."""
    return f"{rec['name']} lives in {rec['city']}."


def record_sentence(rec: dict) -> str:
    return f"{rec['name']} lives in {rec['city']} and has {article(rec['color'])} {rec['color']} {rec['pet']}."


def sentence(rng: random.Random) -> str:
    kind = rng.randrange(7)
    if kind == 0:
        return f"{rng.choice(NAMES)} {rng.choice(VERBS)} the {rng.choice(COLORS)} {rng.choice(OBJECTS)}."
    if kind == 1:
        return f"the {rng.choice(ANIMALS)} is {rng.choice(ADJS)}."
    if kind == 2:
        return f"{rng.choice(NAMES)} lives in {rng.choice(CITIES)}."
    if kind == 3:
        return f"{rng.choice(NAMES)} has a {rng.choice(COLORS)} {rng.choice(ANIMALS)}."
    if kind == 4:
        return f"{rng.choice(NAMES)} {rng.choice(VERBS)} a {rng.choice(FOODS)} and a {rng.choice(FOODS)}."
    if kind == 5:
        return record_sentence(sample_record(rng))
    return f"there are {rng.randint(2, 20)} {rng.choice(ANIMALS)}s in {rng.choice(CITIES)}."


def story(rng: random.Random) -> str:
    return " ".join(sentence(rng) for _ in range(rng.randint(2, 5)))


def list_text(rng: random.Random) -> str:
    cat = rng.choice(list(CATEGORIES))
    words = rng.sample(CATEGORIES[cat], rng.randint(3, 6))
    return f"a list of {cat}s: {', '.join(words)}."


RECORD_QUESTIONS = {  # one look-up per field: the skills the demo task composes
    "name": "What is the name of the person?",
    "city": "Where does the person live?",
    "pet": "What animal does the person have?",
    "color": "What color is the pet?",
}


def other_task(rng: random.Random) -> tuple[str, str, str]:
    """(instruction, context, response) for one of the pre-training tasks (not the demo task)."""
    k = rng.choices(range(6), weights=(8, 1, 1, 1, 1, 1))[0]
    if k == 0:
        rec = sample_record(rng)
        field = rng.choice(list(RECORD_QUESTIONS))
        return RECORD_QUESTIONS[field], record_text(rec), rec[field]
    if k == 5:
        cat = rng.choice(list(CATEGORIES))
        return f"Name {article(cat)} {cat}.", "", rng.choice(CATEGORIES[cat])
    words = rng.sample(LIST_WORDS, rng.randint(3, 5))
    ctx = ", ".join(words)
    if k == 1:
        return "What is the first word in the list?", ctx, words[0]
    if k == 2:
        return "What is the last word in the list?", ctx, words[-1]
    if k == 3:
        return "How many words are in the list?", ctx, str(len(words))
    return "Repeat the list.", ctx, ctx


def pretrain_corpus(rng: random.Random, n_docs: int) -> list[tuple[str, str]]:
    """(prompt, text) documents: 15% stories, 5% plain lists (prompt ""), 80% instruction examples
    of the other tasks (prompt = rendered instruction, text = response)."""
    docs = []
    for _ in range(n_docs):
        u = rng.random()
        if u < 0.15:
            docs.append(("", story(rng)))
        elif u < 0.20:
            docs.append(("", list_text(rng)))
        else:
            ins, ctx, resp = other_task(rng)
            docs.append((render(ins, ctx), resp))
    return docs


def demo_rows(rng: random.Random, n_train: int, n_test: int) -> tuple[list[dict], list[dict]]:
    """Train/test rows of the demo task. The (name, city) pairs, hence the responses, of the test
    split never occur in the train split (a fifth of the 300 pairs is held out), and every record
    (context) is unique."""
    pairs = [(n, c) for n in NAMES for c in CITIES]
    rng.shuffle(pairs)
    held_out = len(pairs) // 5

    def rows(pool, n, seen):
        out = []
        while len(out) < n:
            name, city = rng.choice(pool)
            rec = {"name": name, "city": city, "pet": rng.choice(ANIMALS), "color": rng.choice(COLORS)}
            if record_text(rec) in seen:
                continue
            seen.add(record_text(rec))
            out.append({"instruction": rng.choice(DEMO_INSTRUCTIONS), "context": record_text(rec),
                        "response": demo_response(rec)})
        return out

    seen: set[str] = set()
    return rows(pairs[held_out:], n_train, seen), rows(pairs[:held_out], n_test, seen)


# ---------------------------------------------------------------- tokenizer

SPECIALS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2 (pad/bos/eos, Llama's bos=1 eos=2 layout)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n### Response:\n"
    "{% else %}{{ m['content'] }}{{ eos_token }}\n\n{% endif %}{% endfor %}"
)


def build_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style pre-tokenizer) that prepends <s> like Llama tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=512)
    fast.chat_template = CHAT_TEMPLATE
    return fast


# ---------------------------------------------------------------- model + pre-training

def build_model(vocab_size: int):
    """Llama with 3.4M weights (the shipped model: intermediate 688). lorakit's 4-bit storage only
    needs even input sizes; bitsandbytes' CPU 4-bit kernel rejects 688 output rows, so a peer
    comparison on this model would need 704 -- a 704 model pre-trained by this script did not
    learn the demo task in 150 LoRA steps (exact match 1.7%), so the shipped model keeps 688."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg)


def encode_docs(tokenizer, docs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) per document: <s> prompt text </s>, with instruction prompts masked (-100).

    Masking the prompts matters: their random records and word lists carry ~3-4.5 nats/word of
    noise that drowns the signal of the answers (measured: with a plain LM loss on packed rows the
    model had learned none of the look-up tasks after 500 steps).
    """
    prompts = tokenizer([p for p, _ in docs])["input_ids"]  # each starts with <s>
    texts = tokenizer([t for _, t in docs], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    out = []
    for p, t in zip(prompts, texts):
        plain = len(p) == 1  # prompt "" is only <s>: the whole document is a language-model target
        out.append((p + t + [eos], (p if plain else [-100] * len(p)) + t + [eos]))
    return out


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-pad one document per row -> (input_ids, attention_mask, labels), each [batch, max_len]."""
    import torch

    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), -100)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (x, y) in enumerate(examples):
        ids[row, : len(x)], labels[row, : len(y)], mask[row, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return ids, mask, labels


def per_document_loss(logits, labels):
    """Mean over documents of each document's mean next-token cross-entropy.

    A token-mean would let a 40-token story outweigh a 2-token answer 20:1; the answers are the
    signal that teaches the look-ups (measured: 400 token-mean steps learned none of them).
    logits [batch, len, vocab], labels [batch, len] with -100 where not supervised.
    """
    import torch.nn.functional as F

    pred, target = logits[:, :-1], labels[:, 1:]  # position t predicts token t+1: [batch, len-1, vocab], [batch, len-1]
    ce = F.cross_entropy(pred.transpose(1, 2), target, ignore_index=-100, reduction="none")  # [batch, len-1]
    n = (target != -100).sum(dim=1).clamp(min=1)  # [batch]
    return (ce.sum(dim=1) / n).mean()


def lookup_accuracy(model, tokenizer, fields, n: int = 40, seed: int = 0) -> dict[str, float]:
    """Greedy exact match of the one-field record look-ups on n fresh records per field."""
    import torch

    rng = random.Random(seed)
    recs = [sample_record(rng) for _ in range(n)]
    tokenizer.padding_side = "left"  # generation appends on the right
    acc = {}
    with torch.no_grad():
        for field in fields:
            enc = tokenizer([render(RECORD_QUESTIONS[field], record_text(r)) for r in recs],
                            return_tensors="pt", padding=True)
            out = model.generate(**enc, max_new_tokens=4, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            answers = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            acc[field] = sum(a.strip() == r[field] for a, r in zip(answers, recs)) / n
    tokenizer.padding_side = "right"
    return acc


def pretrain(model, tokenizer, examples, min_steps: int, max_steps: int, batch: int, lr: float,
             seed: int, check_every: int = 100, target: float = 0.95):
    """Plain AdamW loop, one document per row, per-document loss, bf16 autocast (AVX512-BF16 CPUs
    run it ~2x faster), linear warmup then constant lr.

    Stops at the first check after min_steps where the base model does the look-ups the demo task
    composes (name, city: >= target exact match). Each look-up is learned at its own, seed-dependent
    step (a plateau, then a jump): with a fixed step budget of 1000 one seed learned name+city,
    another only color.
    """
    import torch

    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = 50
    t0 = time.time()
    for step in range(1, max_steps + 1):
        model.train()
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, step / warmup)
        ids, mask, labels = collate(rng.sample(examples, batch), tokenizer.pad_token_id)  # [batch, max_len]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids, attention_mask=mask).logits  # [batch, len, vocab]
        loss = per_document_loss(logits.float(), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % check_every == 0:
            model.eval()
            acc = lookup_accuracy(model, tokenizer, list(RECORD_QUESTIONS), seed=seed + step)
            print(f"  step {step:4d}  loss {loss.item():.3f}  look-ups {acc}  {time.time() - t0:5.0f}s",
                  flush=True)
            if step >= min_steps and min(acc["name"], acc["city"]) >= target:
                break
    model.eval()
    return model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "src/lorakit/assets/demo"))
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--docs", type=int, default=60_000, help="pre-training documents")
    ap.add_argument("--min-steps", type=int, default=800, help="pre-training steps at least")
    ap.add_argument("--max-steps", type=int, default=3000, help="pre-training steps at most")
    ap.add_argument("--batch", type=int, default=32, help="documents per step")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--n-train", type=int, default=1200)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 is reproducible and fastest on a shared 2-core machine")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.time()
    out = Path(args.out)
    (out / "model").mkdir(parents=True, exist_ok=True)

    train, test = demo_rows(random.Random(args.seed + 1), args.n_train, args.n_test)
    for name, rows in (("train.jsonl", train), ("test.jsonl", test)):
        with open(out / name, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    docs = pretrain_corpus(random.Random(args.seed), args.docs)
    # The tokenizer also sees the demo rows, so the task's words are not split oddly.
    texts = [p + t for p, t in docs] + [render(**r) for r in train]
    tokenizer = build_tokenizer(texts, args.vocab_size)
    examples = encode_docs(tokenizer, docs)
    n_tok = sum(len(x) for x, _ in examples)
    print(f"corpus: {len(docs)} docs, {n_tok} tokens, {time.time() - t_start:.0f}s", flush=True)

    model = build_model(len(tokenizer))
    pretrain(model, tokenizer, examples, args.min_steps, args.max_steps, args.batch, args.lr, args.seed)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(torch.bfloat16).save_pretrained(out / "model", safe_serialization=True)
    tokenizer.save_pretrained(out / "model")
    print(f"done in {time.time() - t_start:.0f}s -> {out}", flush=True)


if __name__ == "__main__":
    main()
