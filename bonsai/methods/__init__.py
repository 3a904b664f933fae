"""Pruning methods, side by side: each module registers its name(s) and settings (`registry.register_method`).

bonsai/ is Bonsai's sub-model search (and the paper's ablations); flap, llm_pruner, wanda and besa are the
baselines, run once through `one_shot.OneShotRun`. Importing this package registers them all, in the order
`--help` lists them.
"""

from bonsai.methods import registry  # noqa: F401
from bonsai.methods.bonsai import settings as _bonsai  # noqa: F401
from bonsai.methods import wanda as _wanda  # noqa: F401, I001
from bonsai.methods import llm_pruner as _llm_pruner  # noqa: F401
from bonsai.methods import besa as _besa  # noqa: F401
from bonsai.methods import flap as _flap  # noqa: F401
