"""Knowledge distillation inside the orchestrator: capture teacher/student pairs from live traffic,
judge them, export the good ones, train the student, evaluate and register it, and shift traffic
to it as it earns it.

- ``pairs``: a pair row per input, a teacher and a student inference job per pair (placed like any
  job), completed when both answers are in; quality and agreement from ``quality``.
- ``export``: streaming JSONL (OpenAI chat fine-tuning format) with a deterministic split and a manifest.
- ``training`` / ``standin``: a training job through the normal pipeline on the exported data.
- ``registry``: model versions and their stages; ``evaluation`` scores a version on held-out pairs.
- ``traffic``: the canary share of a teacher model's requests the production student takes.
"""
