"""RULER's synthetic long-context tasks, generated offline and sized in the model's own tokens.

Needle retrieval (eight NIAH variants), variable tracking and two word-counting tasks, with RULER's
templates, answer prefixes, generation lengths and string-match scores (github.com/NVIDIA/RULER), so the
effect of compressing the prompt's KV cache can be measured on the benchmark the KV-compression papers
report. :func:`generate` makes the prompts, :func:`score` grades one answer.
"""

from .ruler import generate
from .scoring import score
from .spec import TASKS, Sample

__all__ = ["TASKS", "Sample", "generate", "score"]
