"""Generation within bounded memory: the head never sees a strided input (which made torch copy the
head weight per row), batches are planned from memory/generation.py, whose estimate covers what
generate really allocates."""

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import lorakit
from lorakit.memory.generation import generation_bytes
from lorakit.memory.measure import peak_in_window
from lorakit.memory.shapes import resolve_shape
from lorakit.recipes import generate as gen

from tiny_tokenizers import make_tokenizer, write_tiny_model_folder

PROMPTS = ["Hello world, how are you", "The quick brown fox jumps over the lazy dog. Hello", "cats",
           "What is the capital of France?", "0123456789 numbers tokens labels", "Tell me a joke about dogs"]


def _model(tmp_path, quantization=None):
    folder = write_tiny_model_folder(tmp_path / "m")
    model, tok = lorakit.load_model(str(folder), quantization=quantization, compute_dtype="fp32")
    return model, tok


def test_the_head_gets_a_contiguous_input_and_answers_keep_their_order(tmp_path):
    model, tok = _model(tmp_path)
    seen = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, args, out: seen.append(args[0].is_contiguous()))
    together = gen.generate(model, tok, PROMPTS, max_new_tokens=4, batch_size=4)
    handle.remove()
    assert seen and all(seen)
    one_by_one = [gen.generate(model, tok, [p], max_new_tokens=4, batch_size=1)[0] for p in PROMPTS]
    assert together == one_by_one  # sorted by length inside, returned in the caller's order


def test_generation_workspace_estimate_covers_what_generate_allocates(tmp_path):
    model, tok = _model(tmp_path, quantization="nf4")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function("gen"):
            gen.generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=len(PROMPTS))
    loaded, peak = peak_in_window(prof, "gen")
    longest = max(len(tok(p)["input_ids"]) for p in PROMPTS)
    predicted = generation_bytes(resolve_shape(model), len(PROMPTS), longest, 6, 4, True)["total"]
    measured = peak - loaded
    assert measured <= predicted <= 1.6 * measured, (measured, predicted)


def test_batches_are_planned_to_fit_the_budget(tmp_path, monkeypatch):
    model, tok = _model(tmp_path)
    shape = resolve_shape(model)
    lengths = [len(ids) for ids in tok(PROMPTS)["input_ids"]]
    order = sorted(range(len(PROMPTS)), key=lambda i: lengths[i])
    one = generation_bytes(shape, 1, max(lengths), 4, 4, False)["total"]
    monkeypatch.setattr(gen, "generation_budget", lambda m, n: 2 * one)  # room for about two prompts
    batches = gen._batches(lengths, order, model, 4, None, 16)
    assert sorted(i for b in batches for i in b) == list(range(len(PROMPTS)))
    assert 1 < len(batches) < len(PROMPTS)  # neither one batch nor one prompt at a time
    for b in batches:
        assert generation_bytes(shape, len(b), lengths[b[-1]], 4, 4, False)["total"] <= 2 * one or len(b) == 1
