"""On-the-fly learning: an ASE observer that labels, refits, gates and hot-swaps.

=============  ==================================================================
module         what it holds
=============  ==================================================================
``onthefly``   :class:`OnTheFlyLearner`, the observer
``selection``  selection policies (``every``, ``max_gap``, ``min_gap``,
               ``uncertainty_above``), combined with ``|`` and ``&``
``gate``       the refit job and the validation gate that accepts or rejects it
``rattle``     :class:`RattleConfig`: labels of rattled copies next to the trajectory
``watchdog``   :class:`WatchdogConfig`: what counts as unphysical, and what then
``workdir``    the work-directory format (generations, decisions, history)
``campaign``   :class:`Campaign`: many walkers, one learner (threads or dask)
``walker``     :class:`Walker` and the loop each walker runs
``channels``   how the coordinator and its walkers talk (local or dask)
=============  ==================================================================
"""

from .campaign import Campaign, CampaignResult
from .gate import GateConfig
from .onthefly import OnTheFlyLearner
from .rattle import RattleConfig
from .watchdog import WatchdogConfig
from .walker import Walker
from .selection import (Policy, StepContext, always, every, max_gap, min_gap, never,
                        uncertainty_above)

__all__ = ["OnTheFlyLearner", "GateConfig", "RattleConfig", "WatchdogConfig", "Campaign", "CampaignResult", "Walker", "Policy", "StepContext", "every", "max_gap", "min_gap",
           "uncertainty_above", "always", "never"]
