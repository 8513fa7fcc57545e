"""Task generators and answer checkers of the quality benchmark, and brief LoRA training on a tiny model."""
import json

import pytest
import torch

from lolakernels.benchmarking import train_lora
from lolakernels.benchmarking.tasks import TASKS, input_pool

EXPECTED = {
    "uppercase": ("the value of x", "THE VALUE OF X"),
    "title_case": ("the value of x", "The Value Of X"),
    "reverse_words": ("the value of x", "x of value the"),
    "first_letters": ("the value of x", "tvox"),
    "last_word": ("the value of x", "x"),
    "word_count": ("the value of x", "4"),
    "sort_words": ("the value of x", "of the value x"),
    "double_words": ("the value of", "the the value value of of"),
    "snake_case": ("the value of x", "the_value_of_x"),
    "spell_word": ("value", "v a l u e"),
    "drop_vowels": ("value", "vl"),
    "rot13": ("value", "inyhr"),
}


def test_every_task_has_a_known_answer():
    assert set(EXPECTED) == set(TASKS) and len(TASKS) >= 12
    for name, (text, answer) in EXPECTED.items():
        assert TASKS[name].solve(text) == answer, name


@pytest.mark.parametrize("kind", ["phrase", "word"])
def test_evaluation_inputs_never_seen_in_training(kind):
    train, held_out = input_pool(kind, "train"), input_pool(kind, "eval")
    assert len(held_out) >= 100 and len(train) > len(held_out)
    assert not set(train) & set(held_out)
    assert len(set(held_out)) == len(held_out)


def test_examples_are_deterministic_prompts_with_computed_answers():
    task = TASKS["reverse_words"]
    examples = task.examples(8, seed=3, split="eval")
    assert examples == task.examples(8, seed=3, split="eval")
    assert examples != task.examples(8, seed=4, split="eval")
    for prompt, answer in examples:
        instruction, text, tail = prompt.split("\n")
        assert instruction == task.instruction and tail == ""
        assert 3 <= len(text.split()) <= 6 and text == text.lower()
        assert answer == " ".join(reversed(text.split()))
    # Training draws more examples than the word pool holds: it cycles through the pool.
    many = TASKS["rot13"].examples(len(input_pool("word", "train")) + 5, seed=0)
    assert len(many) == len(input_pool("word", "train")) + 5
    with pytest.raises(ValueError):
        TASKS["rot13"].examples(len(input_pool("word", "eval")) + 1, split="eval")


def test_is_correct_is_exact_up_to_surrounding_whitespace():
    task = TASKS["uppercase"]
    assert task.is_correct("THE VALUE", " THE VALUE\n")
    assert not task.is_correct("THE VALUE", "THE VALUE.")
    assert not task.is_correct("THE VALUE", "the value")


def test_collate_labels_only_answer_tokens():
    pairs = [([1, 2, 3], [4, 5, 9]), ([6], [7, 9])]
    input_ids, attention_mask, labels = train_lora.collate(pairs, pad_id=0)
    assert input_ids.tolist() == [[1, 2, 3, 4, 5, 9], [6, 7, 9, 0, 0, 0]]
    assert attention_mask.tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    ignore = train_lora.IGNORE_INDEX
    # Position t predicts input_ids[t + 1]: the last prompt token predicts the first answer token.
    assert labels.tolist() == [[ignore, ignore, 4, 5, 9, ignore], [7, 9, ignore, ignore, ignore, ignore]]
    input_ids, attention_mask, labels = train_lora.collate(pairs, pad_id=0, padding_side="left")
    assert input_ids[1].tolist() == [0, 0, 0, 6, 7, 9]
    assert labels[1].tolist() == [ignore, ignore, ignore, 7, 9, ignore]


@pytest.fixture
def tiny_model_and_tokenizer(smollm2_tokenizer):
    from lolakernels.models import tiny_llama

    return tiny_llama(vocab_size=len(smollm2_tokenizer)), smollm2_tokenizer


def test_train_adapter_lowers_loss_and_unloads(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = train_lora.TrainConfig(steps=8, batch_size=4, lr=1e-2, warmup_steps=1)
    peft_model = train_lora.train_adapter(model, tokenizer, TASKS["word_count"], config, progress=False)
    losses = peft_model.training_log["loss"]
    assert len(losses) == 8 and sum(losses[-2:]) < sum(losses[:2])
    assert all(p.dtype == torch.float32 for n, p in peft_model.named_parameters() if "lora_" in n)
    restored = peft_model.unload()
    assert restored.state_dict().keys() == before.keys()
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in before.items())


def test_cached_adapter_dirs_trains_once(tiny_model_and_tokenizer, tmp_path, monkeypatch):
    import peft

    monkeypatch.setenv("LOLA_CACHE", str(tmp_path))
    model, tokenizer = tiny_model_and_tokenizer
    config = train_lora.TrainConfig(steps=2, batch_size=2, warmup_steps=0, rank=4, alpha=8)
    dirs = train_lora.cached_adapter_dirs(["word_count", "last_word"], config, model=model, tokenizer=tokenizer,
                                          progress=False)
    assert list(dirs) == ["word_count", "last_word"]
    for name, directory in dirs.items():
        assert directory.parent.parent == tmp_path / "adapters" and directory.name == name
        metadata = json.loads((directory / train_lora.METADATA_FILE).read_text())
        assert metadata["task_fingerprint"] == TASKS[name].fingerprint() and len(metadata["loss"]) == 2
        assert peft.LoraConfig.from_pretrained(str(directory)).r == 4
    stamp = (dirs["word_count"] / "adapter_model.safetensors").stat().st_mtime_ns
    again = train_lora.cached_adapter_dirs(["word_count"], config, model=model, tokenizer=tokenizer, progress=False)
    assert again["word_count"] == dirs["word_count"]
    assert (dirs["word_count"] / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    # The base model comes back without LoRA layers after each adapter.
    assert not any("lora_" in name for name, _ in model.named_modules())
