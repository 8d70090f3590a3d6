"""tests/test_bad_inputs.py's model that returns no loss (a config imports it)."""

from torch import nn

from scale_runner import MODELS, BaseModel


@MODELS.register_module()
class NoLossMLP(BaseModel):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(2, 3)

    def forward(self, inputs, labels=None, mode='tensor'):
        return {'logits': self.net(inputs)}
