"""Sample generations of a causal LM, shown before and after training."""

from __future__ import annotations

import torch


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: list[str], max_new_tokens: int, *, device=None) -> list[str]:
    """Return the greedy continuation of each prompt (the new text only).

    The model runs in eval mode and is put back in its previous mode afterwards. Greedy
    decoding blocks repeated 3-grams, because small models otherwise loop on a phrase.
    """
    was_training = model.training
    model.eval()
    if device is None:
        device = next(model.parameters()).device
    completions = []
    try:
        for prompt in prompts:
            inputs = tokenizer(prompt, return_tensors="pt").to(device)
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                no_repeat_ngram_size=3,
                pad_token_id=tokenizer.pad_token_id,
            )
            new_tokens = output[0, inputs["input_ids"].shape[1]:]
            completions.append(tokenizer.decode(new_tokens, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return completions


def log_generations(generations: list[dict]) -> None:
    """Print each prompt with its completions before and after training."""
    print("\n***** Generations (greedy) *****")
    for entry in generations:
        print(f"  prompt: {entry['prompt']!r}")
        print(f"    before: {entry['prompt']}{entry['before']}")
        print(f"    after : {entry['prompt']}{entry['after']}")
