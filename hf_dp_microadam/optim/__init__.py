"""Update rules applied to the privatized gradient: MicroAdam and the baselines.

The rules contain no privacy code. Every rule is an ordinary `torch.optim.Optimizer`.
"""

from hf_dp_microadam.optim.adambc import AdamBC
from hf_dp_microadam.optim.factory import UPDATE_RULES, create_update_rule
from hf_dp_microadam.optim.microadam import MicroAdam

__all__ = ["AdamBC", "MicroAdam", "UPDATE_RULES", "create_update_rule"]
