"""lego: a thin trainer for early-exit Transformers on top of ``lego_kernels.ops``.

LEGO (stage-based deep supervision + confidence-based early exit) and ASHEM
(hard-example mining + selective layer expansion + two-stage inference).
"""

from lego.ashem import ASHEMResult, run_ashem
from lego.config import ASHEMConfig, ModelConfig, StageConfig, TrainingConfig
from lego.data import Corpus, load_wikitext2, synthetic_corpus
from lego.generation import GenerationOutput, GenerationStats
from lego.model import EarlyExitOutput, EarlyExitStats, LegoModel
from lego.trainer import FitResult, Trainer, evaluate

__all__ = [
    "ASHEMConfig",
    "ASHEMResult",
    "Corpus",
    "EarlyExitOutput",
    "EarlyExitStats",
    "FitResult",
    "GenerationOutput",
    "GenerationStats",
    "LegoModel",
    "ModelConfig",
    "StageConfig",
    "Trainer",
    "TrainingConfig",
    "evaluate",
    "load_wikitext2",
    "run_ashem",
    "synthetic_corpus",
]
