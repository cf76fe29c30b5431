"""Evaluation of generated code.

- `sandbox`: runs untrusted programs in a contained child process (usable on its own).
- `humaneval`: HumanEval problems, prompts, stop sequences, answer extraction, checking programs.
- `passk`: the unbiased pass@k estimator and its mean over problems.

Nothing is imported here, so that `loopcoder.evaluation.sandbox` can be used without the rest.
"""
