from torchrl_dreammpc.objectives.bmpc import BMPCLoss, BMPCPolicyLoss
from torchrl_dreammpc.objectives.dreamer_v3 import DreamerV3CriticEnsembleLoss, DreamerV3TrainingLoss, SlowCriticUpdate
from torchrl_dreammpc.objectives.tdmpc2 import RunningScale, TDMPC2Loss, TDMPC2PolicyLoss, make_tdmpc2_optimizers

__all__ = ["TDMPC2Loss", "TDMPC2PolicyLoss", "RunningScale", "make_tdmpc2_optimizers", "BMPCLoss", "BMPCPolicyLoss",
           "DreamerV3TrainingLoss", "DreamerV3CriticEnsembleLoss", "SlowCriticUpdate"]
