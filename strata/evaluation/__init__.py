"""Accuracy evaluation: perplexity on a built-in English text, the gate for quantized weights and
KV caches."""

from strata.evaluation.perplexity import PerplexityResult, perplexity
from strata.evaluation.text import english_eval_text

__all__ = ["PerplexityResult", "english_eval_text", "perplexity"]
