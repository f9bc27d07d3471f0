"""Evaluation: answer extraction, prompts, scoring modes, metrics and the CLIP baselines."""

from fgvlm.evaluate.answers import extract_answer

__all__ = ["extract_answer"]
