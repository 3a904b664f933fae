from bonsai.data.sources import DATASETS, TextData, load_text
from bonsai.data.windows import calibration_windows, eval_windows, tokenize_text

__all__ = ["DATASETS", "TextData", "calibration_windows", "eval_windows", "load_text", "tokenize_text"]
