"""The loop-count study: LoopCoder-v2's R = 1, 2, 3 comparison in miniature (docs/study.md).

from loopcoder.study import Study, get_preset
report = Study(get_preset("tiny"), "runs/study").run()   # -> runs/study/report.md
"""

from loopcoder.study.pipeline import Study
from loopcoder.study.presets import PRESETS, StudyPreset, get_preset

__all__ = ["PRESETS", "Study", "StudyPreset", "get_preset"]
