"""Every Mixture-of-Experts option, once: its name, default, help text and check.

The :class:`~gcvimoe.moe.MoE` layer, the GCViMoE models, YAML files (an ``moe:`` section) and the command line
(``--top-k 2`` and the like, generated from the fields here) all read :class:`MoEConfig`. Two sets of defaults:

- ``MoEConfig()``: the layer's generic defaults (Tutel's GShard balance loss, no expert dropout);
- :data:`GCVIMOE`: the original GCViMoE / Swin-MoE recipe (expert dropout 0.1, importance + load balance loss), the
  default of every ``gcvimoe_*`` model and of ``gcvimoe train``.
"""
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Sequence, Union

from gcvimoe.errors import GcvimoeError, did_you_mean
from gcvimoe.moe.router import ROUTERS

BALANCE_LOSSES = ('gshard', 'importance_load', 'none')

MoEPlacement = Optional[Union[str, Sequence[Sequence[int]]]]


def _option(default, help: str, choices: Optional[Sequence[str]] = None):
    return field(default=default, metadata={'help': help, 'choices': choices})


@dataclass(frozen=True)
class MoEConfig:
    """The options of every MoE layer of a model (see :class:`gcvimoe.moe.MoE` for what each one does)."""
    num_experts: int = _option(8, "experts per MoE layer; 0 builds the dense model (no MoE layers)")
    top_k: int = _option(1, "experts per token (for expert choice: scales the tokens each expert takes)")
    capacity_factor: float = _option(1.25, "training capacity: an expert takes k * int(factor * ceil(t / e)) of t "
                                           "tokens; 0 = dropless")
    eval_capacity_factor: float = _option(0.0, "capacity factor in evaluation; 0 = dropless, so a prediction never "
                                               "depends on the rest of the batch")
    router: str = _option('linear', "linear (softmax over experts, then top-k), cosine (Swin-MoE), expert_choice, or "
                                    "one added with gcvimoe.moe.register_router", ROUTERS)
    normalize_gates: bool = _option(False, "divide a token's k gates by their sum (before capacity drops)")
    batch_priority: bool = _option(True, "batch-priority routing: the most confident tokens claim slots first")
    gate_noise: float = _option(0.0, "noisy routing in training: logit noise of std gate_noise / num_experts")
    expert_dropout: float = _option(0.0, "dropout on the experts' hidden activations (Swin-MoE's moe_drop)")
    balance_loss: str = _option('gshard', "gshard, importance_load (V-MoE) or none", BALANCE_LOSSES)
    aux_loss_weight: float = _option(0.01, "weight of the balance loss in the aux loss")
    z_loss_weight: float = _option(0.0, "weight of the ST-MoE router z-loss in the aux loss")
    shared_expert: bool = _option(False, "a dense MLP beside the experts, mixed per token (DeepSpeed's residual MoE)")
    moe_blocks: Any = _option(None, "where the MoE layers go (models only): null = the model's own placement ('swin' "
                                    "for most, every 2nd block of stages 1-4 for gcvimoe_pico), 'swin', "
                                    "'every 2nd block of stages 3-4', 'last 4 blocks', 'all', 'none' or "
                                    "[[-1],[-1],[1,3,5],[1]]")

    def __post_init__(self):
        _check(isinstance(self.num_experts, int) and not isinstance(self.num_experts, bool) and self.num_experts >= 0,
               f"num_experts must be an integer >= 0 (0 = dense), got {self.num_experts!r}")
        top_k_ok = isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 1
        _check(top_k_ok and (self.num_experts == 0 or self.top_k <= self.num_experts),
               f"top_k must be an integer in [1, num_experts={self.num_experts}], got {self.top_k!r}")
        for name in ('capacity_factor', 'eval_capacity_factor'):
            value = getattr(self, name)
            _check(_is_number(value) and value >= 0, f"{name} must be >= 0 (0 = dropless), got {value!r}")
        for name in ('gate_noise', 'aux_loss_weight', 'z_loss_weight'):
            value = getattr(self, name)
            _check(_is_number(value) and value >= 0, f"{name} must be a number >= 0, got {value!r}")
        _check(_is_number(self.expert_dropout) and 0 <= self.expert_dropout < 1,
               f"expert_dropout must be in [0, 1), got {self.expert_dropout!r}")
        for name in ('normalize_gates', 'batch_priority', 'shared_expert'):
            _check(isinstance(getattr(self, name), bool), f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ('router', 'balance_loss'):
            choices = FIELDS[name].metadata['choices']
            _check(getattr(self, name) in choices,
                   f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        _check(self.gate_noise == 0 or self.router != 'expert_choice',
               f"gate_noise applies to the token-choice routers (linear, cosine), got {self.gate_noise} with "
               f"router=expert_choice")
        _check(self.moe_blocks is None or isinstance(self.moe_blocks, (str, list, tuple)),
               f"moe_blocks must be a placement name or a per-stage list, got {self.moe_blocks!r}")

    @property
    def is_dense(self) -> bool:
        return self.num_experts == 0

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> 'MoEConfig':
        """A copy with ``changes`` (MoE option names), checked like the constructor's."""
        check_keys(changes)
        return dataclasses.replace(self, **changes)

    @classmethod
    def resolve(cls, moe: Union['MoEConfig', Mapping[str, Any], None] = None, base: Optional['MoEConfig'] = None,
                **options) -> 'MoEConfig':
        """``base`` (default: :data:`GCVIMOE`) updated by ``moe`` (a config or a dict) and then by flat ``options``
        (``num_experts=8``, ``top_k=2``, ... as ``timm.create_model`` passes them)."""
        config = GCVIMOE if base is None else base
        if isinstance(moe, MoEConfig):
            config = moe
        elif moe is not None:
            if not isinstance(moe, Mapping):
                raise GcvimoeError(f"moe must be a MoEConfig, a dict of MoE options or None, got {type(moe).__name__}")
            config = config.replace(**dict(moe))
        return config.replace(**options) if options else config


FIELDS = {f.name: f for f in dataclasses.fields(MoEConfig)}
FIELD_TYPES = typing.get_type_hints(MoEConfig)

def check_keys(options: Mapping[str, Any]) -> None:
    """Raise a one-line error naming the nearest option for every unknown key."""
    for key in options:
        if key not in FIELDS:
            hint = did_you_mean(key, FIELDS, fallback=f"the MoE options are {', '.join(FIELDS)}")
            raise GcvimoeError(f"unknown MoE option {key!r}; {hint}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise GcvimoeError(message)


GCVIMOE = MoEConfig(expert_dropout=0.1, balance_loss='importance_load')
"""The original GCViMoE recipe (Swin-MoE settings): top-1, capacity 1.25, batch priority, expert dropout 0.1, the
importance + load balance loss at weight 0.01, the model's own placement (Swin-MoE's but for gcvimoe_pico's small
maps), dropless evaluation."""
