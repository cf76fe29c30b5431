"""Evaluation of generated code.

- `sandbox`: runs untrusted programs in a contained child process (usable on its own).
- `humaneval`: HumanEval problems, prompts, stop sequences, answer extraction, checking programs.
- `passk`: the unbiased pass@k estimator and its mean over problems.
- `benchmark_files`, `checks`, `file_tasks`: HumanEval+, MBPP+, CRUXEval and LiveCodeBench from the
  files a user supplies, their checking programs and their scoring.
- `lm_eval_backend`: `--model loopcoder` for lm-evaluation-harness (needs the `lm-eval` extra).

Nothing is imported here, so that `loopcoder.evaluation.sandbox` can be used without the rest.
"""
