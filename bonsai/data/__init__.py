from bonsai.data.sources import DATASETS, TextData, load_text
from bonsai.data.windows import (
                                 BOS_MODES,
                                 bos_record,
                                 calibration_windows,
                                 consecutive_windows,
                                 eval_windows,
                                 resolve_bos,
                                 tokenize_text,
)

__all__ = ["BOS_MODES", "DATASETS", "TextData", "bos_record", "calibration_windows", "consecutive_windows",
           "eval_windows", "load_text", "resolve_bos", "tokenize_text"]
