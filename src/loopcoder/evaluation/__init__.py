"""Evaluation of generated code.

- `sandbox`: runs untrusted programs, checked runs and shell commands in contained child processes
  (usable on its own, with `sandbox_launcher`, the code its child interpreter runs, and `cgroups`).
- `channel`: both sides of a checked run (the model's code, and the trusted check that decides).
- `humaneval`: HumanEval problems, prompts, stop sequences, answer extraction, checking programs.
- `passk`: the unbiased pass@k estimator and its mean over problems.
- `benchmark_files`, `checks`, `file_tasks`: HumanEval+, MBPP+, CRUXEval and LiveCodeBench from the
  files a user supplies, their checking programs and their scoring.
- `lm_eval_backend`: `--model loopcoder` for lm-evaluation-harness (needs the `lm-eval` extra).

Nothing is imported here, so that `loopcoder.evaluation.sandbox` can be used without the rest.
"""
