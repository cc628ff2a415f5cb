"""Where a run's scalars go: TensorBoard, Weights & Biases, or any sink registered by name.

A sink is a :class:`ScalarSink` subclass with ``@register_sink``: its ``switch`` names the config key that turns it
on (none: always on); :meth:`~ScalarSink.open` returns the sink, or None where its package is missing;
:meth:`~ScalarSink.add` gets the scalars of one step, :meth:`~ScalarSink.close` ends it. Nothing else in the trainer
names a sink.

    @register_sink
    class Printed(ScalarSink):
        name = "printed"
        @classmethod
        def open(cls, output_dir, cfg, purge_step):
            return cls()
        def add(self, axis, step, scalars):
            print(axis, step, scalars)

Every sink gets the same scalars, on the primary process only: at the log steps on the micro-batch axis
(``step/...``) and once per epoch on the epoch axis (``epoch/...``), never every step. Each MoE layer adds
``experts/<layer>/load_cv`` (coefficient of variation of the tokens its experts were asked to take),
``max_load`` (the busiest expert's tokens over the mean; 1 is balanced) and ``dropped_fraction``.
"""
import importlib
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Type

from gcvimoe.errors import GcvimoeError, first_line
from gcvimoe.train.config import TrainConfig
from gcvimoe.train.distributed import DistInfo

_logger = logging.getLogger("gcvimoe.train")


class ScalarSink:
    """One destination of the run's scalars. Subclasses set ``name`` and implement :meth:`open` and :meth:`add`.

    Attributes:
        name: The name it is registered under.
        switch: The boolean :class:`~gcvimoe.train.config.TrainConfig` key that turns it on, or "" for always on.
    """
    name = ""
    switch = ""

    @classmethod
    def open(cls, output_dir: Path, cfg: TrainConfig, purge_step: Optional[int]) -> Optional['ScalarSink']:
        """The sink for a run writing to ``output_dir`` (its ``switch`` on), or None where it is not installed.

        ``purge_step`` is a resumed run's first step (None for a new run): what a killed run logged from that step on
        is logged again."""
        raise NotImplementedError

    def add(self, axis: str, step: int, scalars: Mapping[str, float]) -> None:
        """``scalars`` (tagged ``<axis>/<name>``) at ``step``: ``axis`` is 'step' (micro-batches) or 'epoch'."""
        raise NotImplementedError

    def close(self) -> None:
        """Flush and release what the sink holds; called once, at the end of the run."""


SINKS: Dict[str, Type[ScalarSink]] = {}
"""Sink name -> :class:`ScalarSink` subclass; :func:`register_sink` adds one."""


def register_sink(cls: Type[ScalarSink]) -> Type[ScalarSink]:
    """Class decorator: every run opens the sink ``cls`` (which may decline, see :meth:`ScalarSink.open`)."""
    if not cls.name:
        raise ValueError(f"a scalar sink needs a name: {cls.__name__}")
    SINKS[cls.name] = cls
    return cls


def _installed(module: str, missing: str):
    """``module`` imported, or None after logging ``missing``: a sink whose package is absent is skipped, not an
    error."""
    try:
        return importlib.import_module(module)
    except ImportError:
        _logger.info(missing)
        return None


@register_sink
class TensorBoardSink(ScalarSink):
    """``<output>/tensorboard``, with ``tensorboard: true`` (the default) and tensorboard installed."""
    name = switch = "tensorboard"

    def __init__(self, writer):
        self.writer = writer

    @classmethod
    def open(cls, output_dir: Path, cfg: TrainConfig, purge_step: Optional[int]) -> Optional['TensorBoardSink']:
        tensorboard = _installed("torch.utils.tensorboard", "tensorboard: not installed, no TensorBoard logs "
                                 "(pip install tensorboard, or --no-tensorboard)")
        if tensorboard is None:
            return None
        _logger.info("tensorboard: tensorboard --logdir %s", output_dir / "tensorboard")
        # purge_step drops the steps a killed run wrote from there on, so the steps it re-runs do not appear twice
        return cls(tensorboard.SummaryWriter(str(output_dir / "tensorboard"), purge_step=purge_step))

    def add(self, axis: str, step: int, scalars: Mapping[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        if axis == "epoch":
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()


@register_sink
class WandbSink(ScalarSink):
    """A Weights & Biases run in ``<output>/wandb`` (project ``$WANDB_PROJECT``, default gcvimoe), with ``log_wandb``
    and wandb installed; the run's config is the training config."""
    name, switch = "wandb", "log_wandb"

    def __init__(self, run):
        self.run = run

    @classmethod
    def open(cls, output_dir: Path, cfg: TrainConfig, purge_step: Optional[int]) -> Optional['WandbSink']:
        wandb = _installed("wandb", "log_wandb: wandb is not installed, no W&B logs (pip install wandb)")
        if wandb is None:
            return None
        try:
            run = wandb.init(project=os.environ.get("WANDB_PROJECT", "gcvimoe"), name=output_dir.name,
                             dir=str(output_dir), config=cfg.to_dict())
        except wandb.errors.Error as e:
            raise GcvimoeError(f"--log-wandb: {first_line(e)}; run `wandb login`, set WANDB_MODE=offline, "
                               "or train without --log-wandb") from None
        for axis in ("step", "epoch"):
            run.define_metric(axis)
            run.define_metric(f"{axis}/*", step_metric=axis)
        return cls(run)

    def add(self, axis: str, step: int, scalars: Mapping[str, float]) -> None:
        self.run.log({**scalars, axis: step})

    def close(self) -> None:
        self.run.finish()


class ScalarLog:
    """The open sinks of a run; with none (and on every process but the primary) a no-op."""

    def __init__(self, sinks: Optional[List[ScalarSink]] = None):
        self.sinks = sinks if sinks is not None else []

    def add(self, axis: str, step: int, scalars: Mapping[str, float]) -> None:
        """``scalars`` as ``<axis>/<name>`` at ``step``: ``axis`` is 'step' (micro-batches) or 'epoch'."""
        tagged = {f"{axis}/{name}": float(value) for name, value in scalars.items()}
        for sink in self.sinks:
            sink.add(axis, step, tagged)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


@contextmanager
def scalar_log(output_dir: Path, info: DistInfo, cfg: TrainConfig, purge_step: Optional[int] = None
               ) -> Iterator[ScalarLog]:
    """A :class:`ScalarLog` of every registered sink that ``cfg`` switches on and that opens, on the primary process;
    closed on leaving the block."""
    log = ScalarLog()
    try:
        if info.is_primary:
            for sink_cls in SINKS.values():
                if sink_cls.switch and not getattr(cfg, sink_cls.switch):
                    continue
                sink = sink_cls.open(output_dir, cfg, purge_step)
                if sink is not None:
                    log.sinks.append(sink)
        yield log
    finally:
        log.close()
