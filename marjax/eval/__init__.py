"""Evaluation: sliding-window perplexity, zero-shot multiple-choice tasks (lm-eval-harness
conventions), LAMBADA, and student-vs-teacher generation metrics: `scoring` (encode, batch,
log-likelihood), `perplexity`, `tasks` (task files), `suite` (task names -> metrics),
`generation`, `energy`; `cli` is `marjax eval`. Scorers take a
`logits_fn(ids int32 (b, l)) -> float32 (b, l, V)` and a tokenizer, so they run with any model."""
from marjax.eval.generation import (distinct_n, generation_eval, prefix_agreement, repetition_rate,
                                    teacher_logprobs)
from marjax.eval.suite import evaluate, evaluate_task, sample_stderr, score_lambada, score_multiple_choice
from marjax.eval.perplexity import file_perplexity, rolling_windows, text_perplexity, token_nll
from marjax.eval.scoring import encode_pair, loglikelihood, loglikelihood_tokens
from marjax.eval.tasks import KNOWN_TASKS, ClozeItem, MCItem, load_task

__all__ = [
    "MCItem", "ClozeItem", "KNOWN_TASKS", "load_task", "encode_pair", "loglikelihood", "loglikelihood_tokens",
    "sample_stderr", "score_multiple_choice", "score_lambada", "evaluate_task", "evaluate",
    "rolling_windows", "token_nll", "text_perplexity", "file_perplexity", "distinct_n", "repetition_rate",
    "prefix_agreement", "teacher_logprobs", "generation_eval",
]
