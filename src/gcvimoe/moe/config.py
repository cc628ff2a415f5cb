"""Every Mixture-of-Experts option, once: its name, default, help text and check.

The :class:`~gcvimoe.moe.MoE` layer, the GCViMoE models, YAML files (an ``moe:`` section) and the command line
(``--top-k 2`` and the like, generated from the fields here) all read :class:`MoEConfig`. Two sets of defaults:

- ``MoEConfig()``: the layer's generic defaults (Tutel's GShard balance loss, no expert dropout);
- :data:`GCVIMOE`: the original GCViMoE / Swin-MoE recipe (expert dropout 0.1, importance + load balance loss), the
  default of every ``gcvimoe_*`` model and of ``gcvimoe train``.
"""
import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Union

from gcvimoe.errors import GcvimoeError, did_you_mean
from gcvimoe.fields import Check, Fields, option
from gcvimoe.moe.router import ROUTERS

BALANCE_LOSSES = ('gshard', 'importance_load', 'none')

MoEPlacement = Optional[Union[str, Sequence[Sequence[int]]]]


def _at_least_0(says: str) -> Check:
    return Check(lambda value, config: value >= 0, says)


_DROPLESS = _at_least_0("must be >= 0 (0 = dropless)")
_WEIGHT = _at_least_0("must be a number >= 0")
_TOP_K = Check(lambda k, config: k >= 1 and (config.num_experts == 0 or k <= config.num_experts),
               "must be an integer in [1, num_experts={config.num_experts}]")


@dataclass(frozen=True)
class MoEConfig:
    """The options of every MoE layer of a model (see :class:`gcvimoe.moe.MoE` for what each one does)."""
    num_experts: int = option(8, "experts per MoE layer; 0 builds the dense model (no MoE layers)",
                              check=_at_least_0("must be an integer >= 0 (0 = dense)"))
    top_k: int = option(1, "experts per token (for expert choice: scales the tokens each expert takes)",
                        check=_TOP_K)
    capacity_factor: float = option(1.25, "training capacity: an expert takes k * int(factor * ceil(t / e)) of t "
                                          "tokens; 0 = dropless", check=_DROPLESS)
    eval_capacity_factor: float = option(0.0, "capacity factor in evaluation; 0 = dropless, so a prediction never "
                                              "depends on the rest of the batch", check=_DROPLESS)
    router: str = option('linear', "linear (softmax over experts, then top-k), cosine (Swin-MoE), expert_choice, or "
                                   "one added with gcvimoe.moe.register_router", ROUTERS)
    normalize_gates: bool = option(False, "divide a token's k gates by their sum (before capacity drops)")
    batch_priority: bool = option(True, "batch-priority routing: the most confident tokens claim slots first")
    gate_noise: float = option(0.0, "noisy routing in training: logit noise of std gate_noise / num_experts",
                              check=_WEIGHT)
    expert_dropout: float = option(0.0, "dropout on the experts' hidden activations (Swin-MoE's moe_drop)",
                                  check=Check(lambda p, config: 0 <= p < 1, "must be in [0, 1)"))
    balance_loss: str = option('gshard', "gshard, importance_load (V-MoE) or none", BALANCE_LOSSES)
    aux_loss_weight: float = option(0.01, "weight of the balance loss in the aux loss", check=_WEIGHT)
    z_loss_weight: float = option(0.0, "weight of the ST-MoE router z-loss in the aux loss",
                                 check=_WEIGHT)
    shared_expert: bool = option(False, "a dense MLP beside the experts, mixed per token (DeepSpeed's residual MoE)")
    moe_blocks: Any = option(None, "where the MoE layers go (models only): null = the model's own placement ('swin' "
                                   "for most, every 2nd block of stages 1-4 for gcvimoe_pico), 'swin', "
                                   "'every 2nd block of stages 3-4', 'last 4 blocks', 'all', 'none' or "
                                   "[[-1],[-1],[1,3,5],[1]]",
                            check=Check(lambda blocks, config: isinstance(blocks, (str, list, tuple)),
                                        "must be a placement name or a per-stage list"))

    def __post_init__(self):
        FIELDS.check(self)
        if self.gate_noise != 0 and self.router == 'expert_choice':
            raise GcvimoeError(f"gate_noise applies to the token-choice routers (linear, cosine), got "
                               f"{self.gate_noise} with router=expert_choice")

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


FIELDS = Fields(MoEConfig, label="{}")
"""The MoE options by name, with their types, coercion, checks and ``--flags`` (see :class:`gcvimoe.fields.Fields`)."""


def check_keys(options: Mapping[str, Any]) -> None:
    """Raise a one-line error naming the nearest option for every unknown key."""
    for key in options:
        if key not in FIELDS:
            hint = did_you_mean(key, FIELDS, fallback=f"the MoE options are {', '.join(FIELDS)}")
            raise GcvimoeError(f"unknown MoE option {key!r}; {hint}")


GCVIMOE = MoEConfig(expert_dropout=0.1, balance_loss='importance_load')
"""The original GCViMoE recipe (Swin-MoE settings): top-1, capacity 1.25, batch priority, expert dropout 0.1, the
importance + load balance loss at weight 0.01, the model's own placement (Swin-MoE's but for gcvimoe_pico's small
maps), dropless evaluation."""
