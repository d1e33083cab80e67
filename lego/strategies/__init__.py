"""Training strategies of ``python -m lego.train``, registered by name.

``lego.strategies.base`` defines the ``Strategy`` interface and the registry; the
built-in strategies register themselves when their modules are imported here:

============================ ======================================================
``standard``                 one loss at the last layer (``lego.strategies.stages``)
``deep-supervision``         LEGO stages, any layout (``lego.strategies.stages``)
``ashem``                    ASHEM (``lego.strategies.ashem``)
``layerskip``                LayerSkip-style training (``lego.strategies.layerskip``)
============================ ======================================================

A strategy of your own plugs in without editing ``lego/``: subclass ``Strategy`` (or
``LayersStrategy``) in any module and pass ``--strategy package.module:Class``, or
declare it under the ``lego.strategies`` entry-point group to use its ``name``.
"""

from lego.strategies.base import (
    ENTRY_POINT_GROUP,
    RunContext,
    Strategy,
    load_strategy,
    register,
    registered,
    strategy_names,
)

from lego.strategies.stages import DeepSupervision, LayersStrategy, Standard  # isort: skip
from lego.strategies.ashem import ASHEM  # isort: skip
from lego.strategies.layerskip import LayerSkip, LayerSkipTrainer  # isort: skip

__all__ = [
    "ASHEM",
    "ENTRY_POINT_GROUP",
    "DeepSupervision",
    "LayerSkip",
    "LayerSkipTrainer",
    "LayersStrategy",
    "RunContext",
    "Standard",
    "Strategy",
    "load_strategy",
    "register",
    "registered",
    "strategy_names",
]
