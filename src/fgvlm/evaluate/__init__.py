"""Evaluation: answer extraction, prompts, scoring modes, the VLM runners, metrics and the CLIP
baselines."""

from fgvlm.evaluate.answers import extract_answer

__all__ = ["extract_answer"]
