from torchrl_dreammpc.modules.base import WorldModelBase
from torchrl_dreammpc.modules.bmpc import BMPCConfig, BMPCWorldModel
from torchrl_dreammpc.modules.dreamer import DREAMER_V3_SIZES, DreamerV3Config, DreamerV3WorldModel
from torchrl_dreammpc.modules.layers import EnsembleMLP, NormedLinear, SimNorm, mlp
from torchrl_dreammpc.modules.planning import BMPCPlanningOps, TDMPC2PlanningOps
from torchrl_dreammpc.modules.two_hot import SymlogTwoHot
from torchrl_dreammpc.modules.world_model import (
    MODEL_SIZES,
    TDMPC2Config,
    TDMPC2WorldModel,
    discount_from_episode_length,
)

__all__ = ["WorldModelBase", "EnsembleMLP", "NormedLinear", "SimNorm", "mlp", "SymlogTwoHot", "MODEL_SIZES",
           "TDMPC2Config", "TDMPC2WorldModel", "TDMPC2PlanningOps", "discount_from_episode_length", "BMPCConfig",
           "BMPCWorldModel", "BMPCPlanningOps", "DreamerV3WorldModel", "DreamerV3Config", "DREAMER_V3_SIZES"]
