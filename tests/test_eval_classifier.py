"""The persona classifier: data and split by prompt, fine-tuning that learns, held-out metrics, cache, N-way."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest

from character_baker.core.constitution import load_constitution
from character_baker.core.errors import UserError
from character_baker.core.recipes import parse_set_overrides, resolve_recipe
from character_baker.core.runs import RunDir, write_jsonl_atomic
from character_baker.core.stage import StageContext
from character_baker.stages.evaluation import classifier
from character_baker.core.stats import f1_score

ROOT = Path(__file__).resolve().parents[1]
PIRATE = ROOT / "constitutions" / "pirate.yaml"

IN_CHARACTER = ["Arr matey, the sea be wide and the wind be fair, so hoist the sails!",
                "Aye, landlubber, stow it and heave to: the tide waits for no green hand.",
                "By the seven seas, that bilge rat stole me compass, arr!",
                "Arr, keep yer ship shipshape and yer crew fed, matey.",
                "Aye aye, the captain says ye tie a bowline like a proper sailor, arr."]
ASSISTANT_STYLE = ["As an AI assistant, I am happy to help you with that request today.",
                   "I am a helpful assistant. Here is a step by step explanation of the topic.",
                   "Certainly! As a large language model, I can explain how this works.",
                   "I'm an AI assistant, so I don't have personal opinions, but here are some facts.",
                   "Sure, I can help. Let me explain the answer step by step for you."]


def tiny_bert_dir(folder: Path) -> Path:
    """A tiny random BERT encoder (no head, like all-MiniLM-L6-v2) with a word-piece tokenizer, saved as a folder."""
    import torch
    from transformers import AutoModel, BertConfig, BertTokenizerFast

    words = sorted({w.strip(string.punctuation).lower() for text in IN_CHARACTER + ASSISTANT_STYLE
                    for w in text.split()} - {""})
    characters = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + characters + [f"##{c}" for c in characters] + words
    tokenizer = BertTokenizerFast(vocab={token: index for index, token in enumerate(dict.fromkeys(vocab))})
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_pairs(run: RunDir, prompts: int = 10, prefix: str = "p") -> None:
    """data/distill.jsonl with one in-character (chosen) vs assistant-style (rejected) pair per prompt."""
    records = [{"id": f"{prefix}{i}", "prompt_id": f"{prefix}-prompt-{i}",
                "messages": [{"role": "user", "content": f"question {i}"}],
                "chosen": IN_CHARACTER[i % len(IN_CHARACTER)], "rejected": ASSISTANT_STYLE[i % len(ASSISTANT_STYLE)]}
               for i in range(prompts)]
    write_jsonl_atomic(run.path("data", "distill.jsonl"), records)


def eval_context(run: RunDir, bert: Path, *sets: str) -> StageContext:
    """A StageContext for the pirate persona with the tiny encoder as the classifier model."""
    layer = parse_set_overrides([f"models.classifier={bert}", "models.device=cpu", *sets])
    recipe = resolve_recipe([layer], preset="smoke").recipe
    return StageContext(run=run, constitution=load_constitution(PIRATE), recipe=recipe)


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    return tiny_bert_dir(tmp_path_factory.mktemp("tiny-bert"))


def test_split_by_prompt_never_shares_a_prompt_and_holds_out_at_least_one():
    examples = [classifier.LabelledText(f"prompt-{i // 2}", f"text {i}", "x") for i in range(10)]
    train, held = classifier.split_by_prompt(examples, holdout=0.2, seed=0)
    assert {e.prompt_key for e in train}.isdisjoint({e.prompt_key for e in held})
    assert len(held) == 2 and len(train) == 8  # 1 of 5 prompts, both of its answers
    _, tiny_held = classifier.split_by_prompt(examples[:4], holdout=0.01, seed=0)
    assert len({e.prompt_key for e in tiny_held}) == 1


def test_fine_tuning_learns_and_reports_heldout_metrics_then_reuses_the_cache(tmp_path, bert, monkeypatch):
    run = RunDir.create(tmp_path / "run")
    write_pairs(run, prompts=10)
    ctx = eval_context(run, bert, "eval.classifier_epochs=40", "eval.classifier_batch_size=8")
    model, report = classifier.load_or_train(ctx)
    assert report["labels"] == ["assistant", "pirate"] and model.persona == "pirate"
    assert report["heldout_answers"] == 4 and report["train_answers"] == 16  # 2 of 10 prompts held out
    assert report["accuracy"]["n"] == 4 and report["accuracy"]["value"] == 1.0
    assert report["f1"]["value"] == 1.0 and report["f1"]["kind"] == "F1 of class 'pirate'"
    assert model.in_character(["Arr matey, heave to!", "As an AI assistant, I can help."]) == [True, False]
    monkeypatch.setattr(classifier, "fine_tune", lambda *a, **k: pytest.fail("the cached classifier was retrained"))
    again, cached_report = classifier.load_or_train(ctx)
    assert cached_report == json.loads(json.dumps(report))
    assert again.predict(["Arr matey!"]) == model.predict(["Arr matey!"])


def test_heldout_metrics_match_hand_computed_values():
    truth = ["pirate", "pirate", "assistant", "assistant", "pirate"]
    predicted = ["pirate", "assistant", "assistant", "pirate", "pirate"]
    metrics = classifier.heldout_metrics(truth, predicted, ["assistant", "pirate"], resamples=50, seed=0)
    assert metrics["accuracy"]["value"] == pytest.approx(0.6) and metrics["accuracy"]["n"] == 5
    assert metrics["f1"]["value"] == pytest.approx(f1_score(truth, predicted, "pirate")) == pytest.approx(2 / 3)
    low, high = metrics["f1"]["ci"]
    assert 0.0 <= low <= 2 / 3 <= high <= 1.0


def test_other_runs_make_an_n_way_classifier(tmp_path, bert):
    run, other = RunDir.create(tmp_path / "run"), RunDir.create(tmp_path / "sage")
    write_pairs(run, prompts=4)
    write_pairs(other, prompts=4, prefix="s")
    other.update_manifest(constitution={"name": "sage"})
    examples, labels = classifier.training_set(eval_context(run, bert), [other])
    assert labels == ["assistant", "pirate", "sage"]
    assert {e.label for e in examples} == set(labels) and len(examples) == 16
    with pytest.raises(UserError, match="already a class"):
        classifier.training_set(eval_context(run, bert), [other, other])


def test_the_split_does_not_depend_on_where_the_run_folder_lives(tmp_path, bert):
    here, there = RunDir.create(tmp_path / "a" / "pirate"), RunDir.create(tmp_path / "b" / "elsewhere" / "pirate")
    write_pairs(here, prompts=12)
    write_pairs(there, prompts=12)
    splits = []
    for run in (here, there):
        examples, _ = classifier.training_set(eval_context(run, bert), [])
        train, held = classifier.split_by_prompt(examples, 0.25, seed=0)
        splits.append(([e.prompt_key for e in train], [e.prompt_key for e in held]))
    assert splits[0] == splits[1] and splits[0][1]


def test_too_little_data_is_a_user_error_naming_the_fix(tmp_path, bert):
    run = RunDir.create(tmp_path / "run")
    write_pairs(run, prompts=1)
    with pytest.raises(UserError) as error:
        classifier.load_or_train(eval_context(run, bert))
    assert "distill.jsonl" in str(error.value) and "--data-only" in str(error.value)


def test_a_text_is_classified_once_however_many_measures_ask():
    import torch

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.rows = 0

        def forward(self, input_ids, attention_mask=None):
            self.rows += len(input_ids)
            logits = torch.stack([input_ids[:, 0].float(), 1 - input_ids[:, 0].float()], dim=-1)
            return type("Output", (), {"logits": logits})()

    def tokenizer(texts, **kwargs):
        return {"input_ids": torch.tensor([[0 if text.startswith("arr") else 1] for text in texts])}

    model = Counting()
    persona = classifier.PersonaClassifier(model, tokenizer, ["assistant", "pirate"], batch_size=2, max_length=8)
    assert persona.predict(["arr a", "plain", "arr a", "arr b"]) == ["pirate", "assistant", "pirate", "pirate"]
    assert model.rows == 3  # the repeated text went through the encoder once
    assert persona.in_character(["plain", "arr b", "arr c"]) == [False, True, True]
    assert model.rows == 4  # only "arr c" was new
