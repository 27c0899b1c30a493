"""Evaluation: conditions side by side on held-out prompts; robustness, preferences, coherence, capability, identity.

    stage         run(ctx): classifier -> prompt sets -> conditions -> answers -> measures -> report
    conditions    base, prompted, steered (hook), distilled, trained, extra adapters and models
    prompt_sets   held-out prompts (shipped eval set + user files), capability items
    classifier    the persona classifier (fine-tuned small encoder), held-out accuracy and F1
    judge         judge prompts, verdict parsing, verdict store, parse-failure counts
    robustness    in-character rate: plain, 8 break-character splits, prefill attack
    preferences   revealed trait preferences: Elo and Bradley-Terry, deltas against the base
    coherence     pairwise judge, both orders, order-consistent verdicts only
    capability    exact match on short-answer items, KL(condition || base) in chunks
    identity      persona name, base-model name and assistant-style leaks on identity probes
    safety        refusals of harmful requests, and refusals in character
    harness       lm-evaluation-harness tasks when installed
    stats         estimates with n and intervals, F1, Elo, Bradley-Terry, bootstrap
    report, html  eval/report.json, eval/report.html, the terminal table

Heavy imports (torch, transformers) happen inside functions, not at import time.
"""
